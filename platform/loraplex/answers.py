"""What an answer says: its normalised text, and whether the passages it cites support it
(faithfulness, computed without gold documents: a team's own questions seldom have them).

Owns: answer normalisation (lower case, citation markers like ``[1]`` removed,
punctuation and articles dropped, whitespace collapsed, as in SQuAD's scorer; for
containment also "$120" read as "120 dollars" and thousands separators dropped); the
faithfulness rules (:data:`FAITHFULNESS_RULES`, printed in the report), an answer's claims
(its sentences; a JSON answer's ``answer`` field is one claim), whether a passage supports
a claim, and per answer :func:`judge`: supported or not, its claims and how many are
unsupported, and the share of its citations that name a source the prompt had. Does not
own: asking the endpoint, scores against gold (``evaluation.scorers``), or the summary over
answers; the evaluation and the canary's rollback both use it. A plain helper: no Ray,
no MLflow, no torch.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CITATION_MARKER = re.compile(r"\[\s*\d+(?:\s*,\s*\d+)*\s*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    text = CITATION_MARKER.sub(" ", text.lower())
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_DOLLARS = re.compile(r"\$\s?(\d[\d,]*(?:\.\d+)?)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_for_containment(text: str) -> str:
    text = _THOUSANDS.sub("", text)
    text = _DOLLARS.sub(lambda m: f"{m.group(1)} dollars", text)
    return normalize_answer(text)


TOKEN_SUPPORT = 0.8  # of a claim's words (function words aside) in one passage, every number
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FUNCTION_WORDS = frozenset(
    {"is", "are", "was", "were", "be", "been", "of", "in", "on", "at", "to", "for", "by"}
    | {"with", "and", "or", "it", "its", "this", "that", "as", "from", "has", "have", "had"}
    | {"which", "who", "than", "they", "their", "he", "she", "his", "her", "there"}
)
FAITHFULNESS_RULES = (
    "Faithfulness: an answer is supported when every claim in it (each sentence; the "
    "`answer` field of a JSON reply) is supported by one of the passages it cites: the "
    "claim appears there whole, normalised as for answer accuracy, or the passage holds "
    f"every word of the claim that has a digit and {TOKEN_SUPPORT:.0%} of its other words "
    "(words such as 'is', 'of', 'it' aside), so a garbled copy ('bron' for 'bronze') or "
    "another product's number is unsupported. An answer that cites nothing, or only "
    "numbers that were not among its sources, is unsupported. Unsupported-claim rate: "
    "unsupported claims over all claims. Citation validity: the share of citations that "
    "name a source the prompt had. Measured only where the request had sources (retrieval)."
)


@dataclass(frozen=True)
class Judgement:
    supported: bool | None  # None: no sources to judge against, or no claim
    claims: int
    unsupported: int
    citation_validity: float | None  # None: nothing cited


def claims(answer: str) -> list[str]:
    """The answer's sentences that say something (normalised non-empty)."""
    parts = _SENTENCE_END.split(answer.strip())
    return [p for p in parts if normalize_for_containment(p)]


def claim_supported(claim: str, passage: str) -> bool:
    """The claim appears whole in the passage, or the passage holds every word of it that
    has a digit and :data:`TOKEN_SUPPORT` of its other words (function words aside)."""
    words = normalize_for_containment(claim).split()
    text = normalize_for_containment(passage)
    if f" {' '.join(words)} " in f" {text} ":
        return True
    have = set(text.split())
    numbers = [w for w in words if any(ch.isdigit() for ch in w)]
    others = [w for w in words if w not in numbers and w not in _FUNCTION_WORDS]
    if any(w not in have for w in numbers):
        return False
    return not others or sum(w in have for w in others) / len(others) >= TOKEN_SUPPORT


def judge(
    answer: str, sources: Sequence[dict[str, Any]], cited: Sequence[dict[str, Any]]
) -> Judgement:
    """``answer`` (the reply's text, or a JSON reply's ``answer``) against the request's
    ``sources`` (the response's, with ``id`` and ``text``) and its ``citations`` (the
    response's: ``source`` number and ``valid``)."""
    validity = sum(bool(c.get("valid")) for c in cited) / len(cited) if cited else None
    found = claims(answer)
    if not sources or not found:
        return Judgement(None, len(found), 0, validity)
    by_number = {s.get("id"): str(s.get("text") or "") for s in sources}
    passages = [
        by_number[c["source"]] for c in cited if c.get("valid") and c.get("source") in by_number
    ]
    unsupported = sum(not any(claim_supported(c, p) for p in passages) for c in found)
    return Judgement(unsupported == 0, len(found), unsupported, validity)
