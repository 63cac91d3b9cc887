"""Scorers for model outputs: exact match, token F1, answer accuracy, citations, JSON
compliance, labels.

Owns: the answer-accuracy rules for sentence answers (:data:`ANSWER_ACCURACY_RULES`),
per-example scores and their means. Used by the base-model benchmark, adapter benchmarks
and ``loraplex eval``. Does not own: normalising answers (``loraplex.answers``), running
a model or the report.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from loraplex.answers import CITATION_MARKER, normalize_answer, normalize_for_containment


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    golds = [gold] if isinstance(gold, str) else list(gold)
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


# What "answer accuracy" counts as correct; the evaluation report prints these rules.
MAX_ANSWER_TOKENS = 50
ANSWER_ACCURACY_RULES = (
    "Answer accuracy: an answer is correct when the normalised gold answer appears in the "
    'normalised answer as whole words ("The price of the Casene D300 is 120 dollars." is '
    'correct for "120 dollars"; "1200 dollars" is not). Normalised: lower case, '
    '"$120" read as "120 dollars", thousands separators dropped, citation markers '
    "([1]), punctuation and articles removed, whitespace collapsed. An answer longer than "
    f"{MAX_ANSWER_TOKENS} words is not counted correct (listing candidates is not answering)."
)


def answer_correct(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when a gold answer appears, as whole words, in the (short) prediction; the
    rules are :data:`ANSWER_ACCURACY_RULES`."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    pred = normalize_for_containment(prediction).split()
    if not pred or len(pred) > MAX_ANSWER_TOKENS:
        return 0.0
    padded = f" {' '.join(pred)} "
    for g in golds:
        want = normalize_for_containment(g)
        if want and f" {want} " in padded:
            return 1.0
    return 0.0


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    golds = [gold] if isinstance(gold, str) else list(gold)
    return max(
        _f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in golds
    )


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cited_numbers(text: str) -> list[int]:
    """Source numbers cited in an answer as ``[1]`` or ``[1, 3]``, in order, unique."""
    seen: list[int] = []
    for match in CITATION_MARKER.finditer(text):
        for n in re.findall(r"\d+", match.group()):
            if int(n) not in seen:
                seen.append(int(n))
    return seen


@dataclass(frozen=True)
class CitationScore:
    precision: float | None  # None: nothing was cited
    recall: float


def citation_score(cited: Iterable[str], gold: Iterable[str]) -> CitationScore:
    cited_set, gold_set = set(cited), set(gold)
    hits = len(cited_set & gold_set)
    precision = hits / len(cited_set) if cited_set else None
    recall = hits / len(gold_set) if gold_set else float(not cited_set)
    return CitationScore(precision, recall)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The reply as a JSON object, or None when it is not exactly one."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_compliant(text: str, schema: dict[str, Any]) -> bool:
    value = parse_json_object(text)
    if value is None:
        return False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def label_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    if not labels:
        return 0.0
    hits = sum(
        p.strip().lower() == y.strip().lower() for p, y in zip(predictions, labels, strict=True)
    )
    return hits / len(labels)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
