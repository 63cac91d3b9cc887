"""Scorers: normalisation, EM/F1, answer accuracy, citations, JSON compliance, label
accuracy."""

from loraplex.evaluation.scorers import (
    MAX_ANSWER_TOKENS,
    answer_correct,
    citation_score,
    cited_numbers,
    exact_match,
    json_compliant,
    label_accuracy,
    mean,
    normalize_answer,
    token_f1,
)
from loraplex.prompts import JSON_ANSWER_SCHEMA


def test_normalisation_and_exact_match():
    assert normalize_answer("  The 349 Dollars. [1]") == "349 dollars"
    assert exact_match("349 dollars [2]", "349 dollars") == 1.0
    assert exact_match("$349 dollars!", ["349 dollars", "x"]) == 1.0
    assert exact_match("348 dollars", "349 dollars") == 0.0


def test_answer_accuracy_counts_a_sentence_that_states_the_answer():
    gold = "120 dollars"
    assert answer_correct("The price of the Casene D300 is 120 dollars.", gold) == 1.0
    assert answer_correct("It costs $120 [1].", gold) == 1.0  # $N reads as N dollars
    assert answer_correct("It costs $1,200.", "1200 dollars") == 1.0
    assert answer_correct("The price is 1200 dollars.", gold) == 0.0  # whole words only
    assert answer_correct("The price is 120 euros.", gold) == 0.0
    assert answer_correct("", gold) == 0.0
    assert answer_correct("Scarlet.", ["crimson", "scarlet"]) == 1.0
    # listing candidates is not answering
    hedge = " ".join(["maybe 90 dollars or"] * MAX_ANSWER_TOKENS) + " 120 dollars"
    assert answer_correct(hedge, gold) == 0.0
    # exact match implies answer accuracy
    assert exact_match("120 dollars", gold) == answer_correct("120 dollars", gold) == 1.0


def test_token_f1():
    assert token_f1("349 dollars", "349 dollars") == 1.0
    assert token_f1("349", "349 dollars") == 2 * (1 * 0.5) / 1.5
    assert token_f1("", "349") == 0.0 and token_f1("", "") == 1.0


def test_citations():
    assert cited_numbers("It is 3 [2] and [1, 2] also [3]") == [2, 1, 3]
    s = citation_score(["a", "b"], ["a"])
    assert s.precision == 0.5 and s.recall == 1.0
    assert citation_score([], ["a"]).precision is None
    assert citation_score([], []).recall == 1.0


def test_json_compliance():
    assert json_compliant('{"answer": "x", "sources": [1, 2]}', JSON_ANSWER_SCHEMA)
    assert not json_compliant('{"answer": "x", "sources": [0]}', JSON_ANSWER_SCHEMA)
    assert not json_compliant('{"answer": "x"}', JSON_ANSWER_SCHEMA)
    assert not json_compliant('{"answer": "x", "sources": [], "extra": 1}', JSON_ANSWER_SCHEMA)
    assert not json_compliant("349 dollars", JSON_ANSWER_SCHEMA)
    assert not json_compliant('["answer"]', JSON_ANSWER_SCHEMA)


def test_labels_and_mean():
    assert label_accuracy(["Billing", "shipping "], ["billing", "defect"]) == 0.5
    assert mean([1.0, None, 0.0]) == 0.5 and mean([None]) is None


def test_retrieval_metrics_on_known_answers():
    """recall@k, MRR@10 and nDCG@10 against values worked out by hand; chunks of one
    document count once; a judged query without a ranking scores zero."""
    import math

    from loraplex.evaluation.retrieval import mrr_at, ndcg_at, recall_at, score_rankings

    two = {"a": 1, "b": 1}
    assert recall_at(["a", "x", "b"], two, 1) == 0.5 and recall_at(["a", "x", "b"], two, 3) == 1
    assert mrr_at(["x", "y", "a"], two) == 1 / 3 and mrr_at(["x"] * 10 + ["a"], two) == 0.0
    # dcg = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3)
    assert math.isclose(ndcg_at(["a", "x", "b"], two), 1.5 / (1 + 1 / math.log2(3)))
    # graded: (2^2 - 1) / log2(4) over the ideal (2^2 - 1) / log2(2)
    assert math.isclose(ndcg_at(["x", "y", "a"], {"a": 2}), 0.5)
    assert ndcg_at(["b", "a"], two) == 1.0 and ndcg_at([], two) == 0.0
    m = score_rankings({"q1": ["a", "a", "b"]}, {"q1": {"b": 1}, "q2": {"c": 1}})
    assert m["mrr_at_10"] == (0.5 + 0.0) / 2  # "a" twice is one document: b is 2nd
    assert m["recall_at_1"] == 0.0 and m["recall_at_5"] == 0.5
    assert math.isclose(m["ndcg_at_10"], (1 / math.log2(3)) / 2)


def test_faithfulness_on_known_answers():
    from loraplex.answers import Judgement as J
    from loraplex.answers import judge

    sources = [
        {"id": 1, "text": "The Velmo X200 comes in bronze. Its price is 861 dollars."},
        {"id": 2, "text": "The Velmo X300 comes in scarlet. Its price is 813 dollars."},
    ]
    one, two, bad = (
        [{"source": 1, "valid": True}],
        [{"source": 2, "valid": True}],
        [{"source": 7, "valid": False}],
    )
    # short answers: the value, whole, in a cited passage
    assert judge("bronze", sources, one).supported is True
    assert judge("bron", sources, one).supported is False  # a garbled copy
    assert judge("861 dollars", sources, two).supported is False  # a sibling passage cited
    assert judge("$861", sources, one).supported is True  # read as "861 dollars"
    # nothing cited, or only a number that was not a source: unsupported, validity named
    assert judge("bronze", sources, []) == J(False, 1, 1, None)
    assert judge("bronze", sources, bad) == J(False, 1, 1, 0.0)
    # sentences: every number and 80% of the other words in one cited passage
    sentence = "The price of the Velmo X200 is 861 dollars [1]."
    assert judge(sentence, sources, one).supported is True
    assert judge(sentence.replace("861", "813"), sources, one).supported is False
    both = sentence + " The Velmo X200 comes in scarlet [1]."
    assert judge(both, sources, one) == J(False, 2, 1, 1.0)  # one claim of two unsupported
    # no sources (no retrieval) or nothing said: not judged
    assert judge("bronze", [], []).supported is None
    assert judge("  ", sources, one).supported is None
