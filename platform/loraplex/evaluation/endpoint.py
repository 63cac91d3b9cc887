"""The four-way evaluation: the same questions through a live endpoint, per configuration.

Owns: reading a questions file (JSONL: ``question``/``text``, ``answer``, gold doc ids,
optional ``label``; a BEIR ``queries.jsonl`` with ``metadata.answer``/``gold_doc``
works too), turning configuration names (``base``, ``base+rag``, ``adapter``,
``adapter+rag``, any route, ``MODEL+rag``) into requests, sending them through the
official ``openai`` client with a bounded number in flight, and scoring each answer
(normalised exact match, token F1, answer accuracy, citation precision/recall against gold doc ids,
JSON-schema compliance, label accuracy, latency, tokens; and, without gold, faithfulness
to the cited passages by ``loraplex.answers``). Does not own: the report
(``evaluation.report``) or the scorers (``evaluation.scorers``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraplex import answers
from loraplex.errors import InputError, LoraplexError
from loraplex.evaluation import scorers
from loraplex.evaluation.intervals import metric_intervals
from loraplex.prompts import JSON_ANSWER_SCHEMA

STANDARD = ("base", "base+rag", "adapter", "adapter+rag")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answer: str | None = None
    gold_docs: tuple[str, ...] = ()
    label: str | None = None


# the quality and latency metrics of a configuration's summary (each with an interval)
METRICS = (
    "accuracy",
    "f1",
    "answer_accuracy",
    "compliance",
    "citation_precision",
    "citation_recall",
    "label_accuracy",
    "faithfulness",
    "unsupported_claim_rate",
    "citation_validity",
    "latency_p50_s",
    "latency_p95_s",
)


@dataclass(frozen=True)
class Configuration:
    """One column of the comparison: which model, which task, which retrieval."""

    name: str
    model: str
    task: str | None = None  # None: the route's own
    retrieval: dict[str, Any] | bool | None = None  # None: the route's own; False: off
    adapter_version: str | None = None  # pin the adapter's version (a promotion gate)

    @property
    def json_task(self) -> bool:
        return self.task == "json_answer"


@dataclass
class Record:
    config: str
    question: str
    text: str = ""
    model: str = ""
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: float = 0.0
    f1: float = 0.0
    answer_accuracy: float = 0.0
    cited: list[str] = field(default_factory=list)
    citation_precision: float | None = None
    citation_recall: float | None = None
    compliant: bool | None = None
    label_correct: bool | None = None
    # the request's sources ({id, doc_id, text}) and the answer's citations ({source, valid})
    sources: list[dict[str, Any]] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    faithful: bool | None = None  # None: no sources, or nothing claimed
    claims: int = 0
    unsupported_claims: int = 0
    citation_validity: float | None = None
    error: str | None = None


def load_questions(
    path: Path, split: str | None = None, limit: int | None = None
) -> list[Question]:
    """Questions from JSONL; every malformed line is named (file:line) in one error."""
    if not path.is_file():
        raise InputError(f"questions file {path} does not exist")
    out: list[Question] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            text = row.get("question") or row.get("text") or row.get("query")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("no question text (question, text or query)")
            if split and (row.get("split") or meta.get("split")) not in (None, split):
                continue
            gold = row.get("gold_doc_ids") or row.get("gold_docs") or meta.get("gold_doc") or []
            gold = [gold] if isinstance(gold, str) else list(gold)
            answer = row.get("answer", meta.get("answer"))
            label = row.get("label") or row.get("category")
            out.append(
                Question(
                    str(row.get("id") or row.get("_id") or f"line-{n}"),
                    text.strip(),
                    str(answer) if answer is not None else None,
                    tuple(str(g) for g in gold),
                    str(label) if label is not None else None,
                )
            )
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            problems.append(f"{path}:{n}: {e}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"malformed questions: {problems[0]}{more}")
    if not out:
        raise InputError(f"{path}: no questions" + (f" in split {split!r}" if split else ""))
    return out[:limit] if limit else out


def default_base(models: list[dict[str, Any]], base: str | None) -> str | None:
    """``base``, or the endpoint's first base model."""
    bases = [m["id"] for m in models if (m.get("metadata") or {}).get("kind", "base") == "base"]
    return base or (bases[0] if bases else None)


def resolve_configs(
    names: list[str],
    models: list[dict[str, Any]],
    base: str | None,
    adapter: str,
    retrieval: dict[str, Any],
) -> list[Configuration]:
    """Configuration names -> requests; unknown names are one error listing what exists."""
    by_id = {m["id"]: m for m in models}
    base = default_base(models, base)
    adapter_id = f"{base}:{adapter}"
    out: list[Configuration] = []
    for name in names:
        stem, rag = (name[:-4], True) if name.endswith("+rag") else (name, False)
        stem, _, version = stem.partition("/")  # adapter/3: that version, pinned
        if version and (not version.isdigit() or not stem.startswith("adapter")):
            raise InputError(
                f"configuration {name}: only an adapter takes a version (adapter/3, adapter:NAME/3)"
            )
        if stem == "base":
            if base not in by_id:
                raise InputError(f"configuration {name}: the endpoint has no base model {base!r}")
            model, task = base, "chat"
        elif stem == "adapter" or stem.startswith("adapter:"):  # adapter:NAME: another one
            model = f"{base}:{stem.split(':', 1)[1]}" if ":" in stem else adapter_id
            if model not in by_id:
                raise InputError(
                    f"configuration {name}: the endpoint has no adapter {model!r} "
                    f"(models: {', '.join(by_id)})"
                )
            task = "json_answer"
        elif stem in by_id:  # a route keeps its task; a model answers as it is
            model, task = stem, (by_id[stem].get("metadata") or {}).get("task")
        else:
            raise InputError(
                f"unknown configuration {name!r}: use {', '.join(STANDARD)}, a route or model "
                f"of the endpoint ({', '.join(by_id)}), optionally with +rag"
            )
        route = ((by_id.get(stem) or {}).get("metadata") or {}).get("kind") == "route"
        own = None if route else False  # a route keeps its retrieval; others run without
        retrieval_of = dict(retrieval) if rag else own
        out.append(Configuration(name, model, task, retrieval_of, version or None))
    return out


class Endpoint:
    """The OpenAI-compatible endpoint under evaluation."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 300) -> None:
        import openai

        self.url = url
        self.client = openai.OpenAI(
            base_url=url, api_key=api_key or "none", max_retries=0, timeout=timeout
        )

    def models(self) -> list[dict[str, Any]]:
        import openai

        try:
            return [m.model_dump() for m in self.client.models.list()]
        except openai.AuthenticationError:
            raise InputError(f"{self.url} rejects the API key (401); pass --api-key") from None
        except openai.APIConnectionError:
            raise LoraplexError(
                f"the endpoint {self.url} does not answer: start it with `loraplex serve`"
            ) from None
        except openai.APIStatusError as e:
            raise LoraplexError(f"{self.url}/models answered {e.status_code}") from None

    def ask(self, q: Question, c: Configuration, max_tokens: int) -> Record:
        import openai

        extra: dict[str, Any] = {}
        if c.task is not None:
            extra["task"] = c.task
        if c.retrieval is not None:
            extra["retrieval"] = c.retrieval
        if c.adapter_version is not None:
            extra["adapter_version"] = c.adapter_version
        rec = Record(c.name, q.id)
        started = time.perf_counter()
        try:
            r = self.client.chat.completions.create(
                model=c.model,
                messages=[{"role": "user", "content": q.text}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body=extra,
            )
        except openai.APIConnectionError as e:
            raise LoraplexError(f"the endpoint {self.url} stopped answering ({e})") from None
        except openai.APIStatusError as e:
            rec.error = f"{e.status_code}: {e.message}"[:300]
            rec.latency_s = time.perf_counter() - started
            return rec
        rec.latency_s = time.perf_counter() - started
        rec.text = r.choices[0].message.content or ""
        rec.model = r.model
        rec.prompt_tokens = r.usage.prompt_tokens if r.usage else 0
        rec.completion_tokens = r.usage.completion_tokens if r.usage else 0
        cites = (r.choices[0].model_extra or {}).get("citations") or []
        rec.cited = [x["doc_id"] for x in cites if x.get("doc_id")]
        rec.citations = [{"source": x.get("source"), "valid": x.get("valid")} for x in cites]
        rec.sources = [
            {"id": x.get("id"), "doc_id": x.get("doc_id"), "text": x.get("text")}
            for x in (r.model_extra or {}).get("sources") or []
        ]
        return rec


def score(rec: Record, q: Question, json_task: bool, schema: dict[str, Any] | None) -> Record:
    if rec.error is not None:
        return rec
    answer = rec.text
    if json_task:
        obj = scorers.parse_json_object(rec.text)
        rec.compliant = scorers.json_compliant(rec.text, schema or JSON_ANSWER_SCHEMA)
        if obj is not None and isinstance(obj.get("answer"), str):
            answer = obj["answer"]
        listed = obj.get("sources") if obj is not None else None
        if isinstance(listed, list) and listed and all(isinstance(s, str) for s in listed):
            rec.cited = list(listed)  # doc ids; source numbers come mapped in `citations`
    elif schema is not None:
        rec.compliant = scorers.json_compliant(rec.text, schema)
    if q.answer is not None:
        rec.exact = scorers.exact_match(answer, q.answer)
        rec.f1 = scorers.token_f1(answer, q.answer)
        rec.answer_accuracy = scorers.answer_correct(answer, q.answer)
    if q.gold_docs:
        cs = scorers.citation_score(rec.cited, q.gold_docs)
        rec.citation_precision, rec.citation_recall = cs.precision, cs.recall
    if q.label is not None:
        rec.label_correct = answer.strip().lower() == q.label.strip().lower()
    judged = answers.judge(answer, rec.sources, rec.citations)
    rec.faithful, rec.claims = judged.supported, judged.claims
    rec.unsupported_claims, rec.citation_validity = judged.unsupported, judged.citation_validity
    return rec


def run(
    endpoint: Endpoint,
    questions: list[Question],
    configs: list[Configuration],
    max_tokens: int = 64,
    schema: dict[str, Any] | None = None,
    concurrency: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Every question through every configuration; records in (config, question) order."""
    jobs = [(c, q) for c in configs for q in questions]

    def one(job: tuple[Configuration, Question]) -> Record:
        c, q = job
        rec = score(endpoint.ask(q, c, max_tokens), q, c.json_task, schema)
        if progress:
            progress(1)
        return rec

    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        return list(pool.map(one, jobs))
    finally:  # on Ctrl-C or an error: drop what has not started
        pool.shutdown(wait=False, cancel_futures=True)


def summarize(records: list[Record], configs: list[Configuration]) -> dict[str, dict[str, Any]]:
    """Per configuration: the means and percentiles the report shows."""
    out: dict[str, dict[str, Any]] = {}
    for c in configs:
        rs = [r for r in records if r.config == c.name]
        ok = [r for r in rs if r.error is None]
        lat = [r.latency_s for r in ok]
        judged = [r for r in ok if r.faithful is not None]
        out[c.name] = {
            "model": c.model,
            "questions": len(rs),
            "errors": len(rs) - len(ok),
            "accuracy": scorers.mean(r.exact for r in rs) or 0.0,
            "f1": scorers.mean(r.f1 for r in rs) or 0.0,
            "answer_accuracy": scorers.mean(r.answer_accuracy for r in rs) or 0.0,
            "citation_precision": scorers.mean(r.citation_precision for r in ok),
            "citation_recall": scorers.mean(r.citation_recall for r in ok),
            "compliance": scorers.mean(
                None if r.compliant is None else float(r.compliant) for r in rs
            )
            if any(r.compliant is not None for r in rs)
            else None,
            "label_accuracy": scorers.mean(
                None if r.label_correct is None else float(r.label_correct) for r in ok
            ),
            "faithfulness": scorers.mean(
                None if r.faithful is None else float(r.faithful) for r in ok
            ),
            "unsupported_claim_rate": (
                sum(r.unsupported_claims for r in judged) / sum(r.claims for r in judged)
                if judged
                else None
            ),
            "citation_validity": scorers.mean(r.citation_validity for r in ok),
            "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
            "prompt_tokens": scorers.mean(float(r.prompt_tokens) for r in ok),
            "completion_tokens": scorers.mean(float(r.completion_tokens) for r in ok),
            "served_versions": sorted({r.model for r in ok if ":" in r.model}),
        }
        per_answer = {
            "accuracy": [r.exact for r in rs],
            "f1": [r.f1 for r in rs],
            "answer_accuracy": [r.answer_accuracy for r in rs],
            "citation_precision": [r.citation_precision for r in ok],
            "citation_recall": [r.citation_recall for r in ok],
            "compliance": [None if r.compliant is None else float(r.compliant) for r in rs],
            "label_accuracy": [
                None if r.label_correct is None else float(r.label_correct) for r in ok
            ],
            "faithfulness": [None if r.faithful is None else float(r.faithful) for r in ok],
            # per claim, so its interval is over claims
            "unsupported_claim_rate": [
                float(i < r.unsupported_claims) for r in judged for i in range(r.claims)
            ],
            "citation_validity": [r.citation_validity for r in ok],
            "latency_p50_s": lat,
            "latency_p95_s": lat,
        }
        kept = {k: [v for v in vs if v is not None] for k, vs in per_answer.items()}
        out[c.name]["intervals"] = metric_intervals(kept)
        # per question, for paired differences between configurations
        out[c.name]["by_question"] = {
            "accuracy": {r.question: float(r.exact) for r in rs},
            "answer_accuracy": {r.question: float(r.answer_accuracy) for r in rs},
            "compliance": {r.question: float(r.compliant) for r in rs if r.compliant is not None},
            "faithfulness": {r.question: float(r.faithful) for r in ok if r.faithful is not None},
        }
    return out


def records_as_dicts(records: list[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
