"""The evaluation's parts that need no endpoint: questions files, configuration names,
scoring of one answer, the report folder and the recommendation. The run against a real
served endpoint is in ``test_serving.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.errors import InputError
from loraplex.evaluation import endpoint, report

MODELS = [
    {"id": "tiny", "metadata": {"kind": "base"}},
    {"id": "tiny:json-answer", "metadata": {"kind": "adapter"}},
    {"id": "docs-json", "metadata": {"kind": "route", "task": "json_answer"}},
]


def test_questions_from_jsonl_and_beir(tmp_path: Path) -> None:
    plain = tmp_path / "q.jsonl"
    plain.write_text(
        json.dumps({"id": "a", "question": "Price?", "answer": "5", "gold_doc_ids": ["d1"]})
        + "\n\n"
        + json.dumps({"text": "Charged twice", "label": "billing"})
        + "\n"
    )
    qs = endpoint.load_questions(plain)
    assert qs[0] == endpoint.Question("a", "Price?", "5", ("d1",), None)
    assert qs[1].label == "billing" and qs[1].id == "line-3"
    beir = tmp_path / "queries.jsonl"
    beir.write_text(
        "".join(
            json.dumps(
                {
                    "_id": f"q{i}",
                    "text": "Q?",
                    "metadata": {"answer": "x", "gold_doc": "d", "split": split},
                }
            )
            + "\n"
            for i, split in enumerate(["train", "test", "test"])
        )
    )
    assert [q.id for q in endpoint.load_questions(beir, split="test")] == ["q1", "q2"]
    assert len(endpoint.load_questions(beir, limit=1)) == 1
    with pytest.raises(InputError, match="no questions in split 'dev'"):
        endpoint.load_questions(beir, split="dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"answer": "x"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: no question text .*\(and 1 more\)"):
        endpoint.load_questions(bad)


def test_configuration_names() -> None:
    rag = {"collection": "kb", "top_k": 3, "mode": "hybrid"}
    got = endpoint.resolve_configs(
        ["base", "base+rag", "adapter", "adapter+rag", "docs-json", "tiny+rag"],
        MODELS,
        None,
        "json-answer",
        rag,
    )
    assert [(c.model, c.task, c.retrieval) for c in got] == [
        ("tiny", "chat", False),
        ("tiny", "chat", rag),
        ("tiny:json-answer", "json_answer", False),
        ("tiny:json-answer", "json_answer", rag),
        ("docs-json", "json_answer", None),
        ("tiny", None, rag),
    ]
    other = endpoint.resolve_configs(["adapter:json-answer+rag"], MODELS, None, "x", rag)[0]
    assert (other.model, other.task, other.retrieval) == ("tiny:json-answer", "json_answer", rag)
    # a version pinned: the supervised adapter beside its preference-tuned version
    sft, dpo = endpoint.resolve_configs(
        ["adapter/1+rag", "adapter/2+rag"], MODELS, None, "json-answer", rag
    )
    assert (sft.model, sft.adapter_version, dpo.adapter_version) == ("tiny:json-answer", "1", "2")
    with pytest.raises(InputError, match="only an adapter takes a version"):
        endpoint.resolve_configs(["base/2"], MODELS, None, "json-answer", rag)
    with pytest.raises(InputError, match="unknown configuration 'nope'"):
        endpoint.resolve_configs(["nope"], MODELS, None, "json-answer", rag)
    with pytest.raises(InputError, match="no adapter 'tiny:other'"):
        endpoint.resolve_configs(["adapter"], MODELS, None, "other", rag)


def test_scoring_one_answer() -> None:
    q = endpoint.Question("a", "Price?", "437 dollars", ("urven-e100",), None)
    # source numbers: the doc ids are the server's citations (Endpoint.ask fills `cited`)
    text = '{"answer": "437 dollars", "sources": [1]}'
    rec = endpoint.Record("adapter+rag", "a", text=text, cited=["urven-e100"])
    rec = endpoint.score(rec, q, json_task=True, schema=None)
    assert (rec.exact, rec.compliant, rec.citation_precision, rec.citation_recall) == (
        1.0,
        True,
        1.0,
        1.0,
    )
    # doc ids in the JSON itself (a client's own schema) are scored as they are
    text = '{"answer": "437 dollars", "sources": ["urven-e100", "x"]}'
    rec = endpoint.score(endpoint.Record("adapter+rag", "a", text=text), q, True, None)
    assert (rec.compliant, rec.citation_precision, rec.citation_recall) == (False, 0.5, 1.0)
    rec = endpoint.score(endpoint.Record("base", "a", text="It is 437 dollars."), q, False, None)
    assert rec.exact == 0.0 and rec.f1 > 0.5 and rec.compliant is None
    assert rec.citation_precision is None and rec.citation_recall == 0.0
    assert rec.faithful is None  # no sources: not judged
    # faithfulness: the JSON answer's value against the passage its source number names
    src = [{"id": 1, "doc_id": "urven-e100", "text": "The Urven E100 costs 437 dollars."}]
    cited = [{"source": 1, "valid": True}]
    for value, faithful in (("437 dollars", True), ("473 dollars", False)):
        text = json.dumps({"answer": value, "sources": [1]})
        rec = endpoint.Record("adapter+rag", "a", text=text, sources=src, citations=cited)
        rec = endpoint.score(rec, q, json_task=True, schema=None)
        assert (rec.faithful, rec.claims, rec.citation_validity) == (faithful, 1, 1.0)


def summary_of(**acc) -> dict:
    base = {
        "f1": 0,
        "citation_precision": None,
        "citation_recall": None,
        "label_accuracy": None,
        "latency_p50_s": 0.5,
        "latency_p95_s": 0.9,
        "completion_tokens": 10,
        "errors": 0,
        "questions": 10,
        "served_versions": [],
    }
    out = {}
    for name, (a, c, tokens) in acc.items():
        out[name.replace("_rag", "+rag")] = {
            **base,
            "accuracy": a,
            "answer_accuracy": a,
            "compliance": c,
            "prompt_tokens": tokens,
        }
    return out


def test_report_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    summary = summary_of(
        base=(0.05, None, 30),
        base_rag=(0.72, None, 400),
        adapter=(0.1, 0.97, 40),
        adapter_rag=(0.85, 0.98, 420),
    )
    advice = report.recommend(summary, format_required=True)
    assert "Retrieval adds +67 points of accuracy" in advice
    assert "Recommendation: **adapter+rag**" in advice
    checks = {(c, m): ok for c, m, _, ok in report.target_checks(summary)}
    assert checks[("base+rag", "answer_accuracy")] is True and checks[("adapter+rag", "compliance")]
    out = tmp_path / "r"
    meta = {"url": "u", "questions_file": "q", "questions": 10, "date": "d", "collection": "kb"}
    report.write_report(out, summary, [], meta, advice)
    assert {p.name for p in out.iterdir()} == {"report.md", "chart.png", "results.json"}
    with pytest.raises(FileExistsError):
        report.write_report(out, summary, [], meta, advice)

    def fail(*_: object) -> None:  # the chart fails half-way: nothing is left behind
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "chart", fail)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path / "r2", summary, [], meta, advice)
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r2.partial").exists()


def test_chart_shows_answer_accuracy_with_its_intervals(tmp_path: Path) -> None:
    """base+rag answers in sentences: exact match 0, answer accuracy 0.80. The chart
    plots answer accuracy (what the recommendation rests on), with error bars, and
    faithfulness beside the format and citation metrics."""
    summary = {
        "base+rag": {
            "accuracy": 0.0,
            "answer_accuracy": 0.8,
            "compliance": None,
            "latency_p50_s": 1.8,
            "intervals": {"answer_accuracy": [0.7, 0.87], "latency_p50_s": [1.6, 2.1]},
        },
        "adapter+rag": {
            "accuracy": 0.82,
            "answer_accuracy": 0.83,
            "compliance": 1.0,
            "citation_precision": 0.93,
            "latency_p50_s": 3.0,
            "intervals": {"answer_accuracy": [0.73, 0.9], "compliance": [0.95, 1.0]},
        },
    }
    assert [m for m, _ in report.CHART_METRICS] == [
        "answer_accuracy",
        "compliance",
        "citation_precision",
        "faithfulness",
    ]
    values, (below, above) = report.chart_series(summary, "answer_accuracy")
    assert values == [0.8, 0.83]
    assert below == pytest.approx([0.1, 0.1]) and above == pytest.approx([0.07, 0.07])
    values, (below, above) = report.chart_series(summary, "compliance")
    assert values == [None, 1.0] and below == pytest.approx([0.0, 0.05]) and above == [0.0, 0.0]
    values, (below, above) = report.chart_series(summary, "latency_p50_s")
    assert below[0] == pytest.approx(0.2) and above[0] == pytest.approx(0.3) and below[1] == 0
    report.chart(summary, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_kinds_of_a_json_answer() -> None:
    from loraplex.evaluation.pairs import error_kind

    sources = [{"id": 1, "doc_id": "velmo-x200"}, {"id": 2, "doc_id": "velmo-x300"}]

    def kind(answer: str, cited: list[int]) -> str | None:
        return error_kind(
            json.dumps({"answer": answer, "sources": cited}), sources, "bronze", "velmo-x200"
        )

    assert kind("bronze", [1]) is None
    assert kind("bronze", [2]) == "wrong_citation"  # the right value, a sibling's passage
    assert kind("bronze", []) == "wrong_citation"
    assert kind("bron", [1]) == "garbled_copy"
    assert kind("scarlet", [1]) == "wrong_value"
    assert error_kind('{"answer": "bronze"', sources, "bronze", "velmo-x200") == "broken_json"
    assert error_kind('{"answer": 3, "sources": [1]}', sources, "bronze", "velmo-x200") == (
        "broken_json"
    )


def test_pinned_versions_are_compared_on_the_same_questions() -> None:
    """adapter/1+rag (supervised) beside adapter/2+rag (its DPO version): the report pairs
    them per question on exact match and faithfulness."""
    qs = [f"q{i}" for i in range(40)]
    summary = {
        "adapter/1+rag": {
            "by_question": {
                "accuracy": {q: float(i % 2) for i, q in enumerate(qs)},
                "faithfulness": {q: float(i % 4 != 0) for i, q in enumerate(qs)},
            }
        },
        "adapter/2+rag": {
            "by_question": {
                "accuracy": {q: 1.0 for q in qs},
                "faithfulness": {q: 1.0 for q in qs},
            }
        },
    }
    table = "\n".join(report.differences(summary))
    assert "| exact" not in table
    assert "| accuracy | adapter/1+rag -> adapter/2+rag | +50 |" in table
    assert "| faithfulness | adapter/1+rag -> adapter/2+rag | +25 |" in table
    # the four-way's fifth column: the served version (adapter+rag) against its DPO one
    summary["adapter+rag"] = summary.pop("adapter/1+rag")
    table = "\n".join(report.differences(summary))
    assert "| accuracy | adapter+rag -> adapter/2+rag | +50 |" in table


def test_a_preference_tuned_version_of_the_served_one_is_the_fifth_column(
    settings, tmp_path: Path
) -> None:
    """In a real MLflow registry: the newest DPO/ORPO version whose parent is the version
    the endpoint's adapter serves now joins the four-way as ``adapter/N+rag``; a child of
    another version, a supervised version, pinned configurations or no ``adapter+rag``
    add nothing."""
    from mlflow import MlflowClient

    from loraplex import tracking
    from loraplex.evaluation.provenance import preference_columns
    from loraplex.models import tags

    tracking.setup(settings)
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    name = "fifth-column"
    client.create_registered_model(name)
    lineage = [
        {tags.METHOD: "sft"},  # 1
        {tags.METHOD: "dpo", tags.PARENT_VERSION: f"{name}/1"},  # 2
        {tags.METHOD: "sft"},  # 3
        {tags.METHOD: "orpo", tags.PARENT_VERSION: f"{name}/1"},  # 4: 1's newest child
        {tags.METHOD: "dpo", tags.PARENT_VERSION: f"{name}/3"},  # 5
        {tags.METHOD: "sft", tags.PARENT_VERSION: f"{name}/3"},  # 6: not preference
    ]
    for n, version_tags in enumerate(lineage, 1):
        (tmp_path / f"v{n}").mkdir()
        client.create_model_version(name, str(tmp_path / f"v{n}"), tags=version_tags)
    four = ["base", "base+rag", "adapter", "adapter+rag"]

    def models(registry: str) -> list[dict]:
        card = {"id": "tiny:ja", "metadata": {"kind": "adapter", "registry": registry}}
        return [MODELS[0], card]

    client.set_registered_model_alias(name, "production", "1")
    assert preference_columns(settings, four, models(f"{name}@production"), None, "ja") == [
        "adapter/4+rag"
    ]
    assert preference_columns(settings, four, models(f"{name}/3"), None, "ja") == ["adapter/5+rag"]
    client.set_registered_model_alias(name, "production", "2")  # the DPO one is served
    assert preference_columns(settings, four, models(f"{name}@production"), None, "ja") == []
    assert preference_columns(settings, four, models(f"{name}/4"), None, "ja") == []
    pinned = [*four, "adapter/1+rag"]
    assert preference_columns(settings, pinned, models(f"{name}/1"), None, "ja") == []
    assert preference_columns(settings, four[:3], models(f"{name}/1"), None, "ja") == []
    assert preference_columns(settings, four, models("not-registered/1"), None, "ja") == []
