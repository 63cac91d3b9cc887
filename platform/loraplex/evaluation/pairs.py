"""On-policy preference pairs from an adapter's own mistakes, for DPO/ORPO.

Owns: :class:`PairOptions` and :func:`build_pairs`, the recipe behind ``loraplex pairs
build``: the adapter version answers the questions of a world it was trained on (never a
held-out world: refused where the registry knows its training worlds) through the
endpoint, with retrieval as in production and the JSON-answer task, ``samples`` answers
per question at ``temperature`` (seeded); every wrong answer becomes a pair whose chosen
side is the gold answer citing the gold passage's source number and whose rejected side
is the adapter's own answer, on the prompt the server built (the user turn
``prompts.question_prompt`` writes over the response's sources). Wrong answers are
counted by kind (:data:`KINDS`); a question whose request is refused (400: its prompt
past the context, say) is counted and skipped; the file is written whole (a
``.partial`` renamed) with
its sha256. Does not own: the pair format and its checks (``training.pairs``), or
training.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from loraplex.config import LoraplexConfig, StrictModel
from loraplex.errors import InputError, LoraplexError
from loraplex.evaluation import endpoint, provenance, scorers
from loraplex.prompts import JSON_ANSWER_SCHEMA, Source, json_answer, question_prompt
from loraplex.world.manifest import world_seed

KINDS = ("broken_json", "wrong_value", "garbled_copy", "wrong_citation")
GARBLED = 0.6  # a wrong value at least this similar to the gold one is a garbled copy


class PairOptions(StrictModel):
    questions: Path
    out: Path
    adapter: str = Field(description="The adapter's name on the endpoint (base:NAME).")
    version: str = Field(pattern=r"^\d+$", description="Its registry version (pinned).")
    registry_name: str | None = Field(default=None, description="Default: the adapter name.")
    base_model: str | None = None
    url: str | None = None
    api_key: str | None = None
    collection: str
    top_k: int = Field(default=3, ge=1, le=50)
    mode: str = "hybrid"
    split: str | None = "train"
    limit: int | None = Field(default=None, ge=1)
    samples: int = Field(default=4, ge=1, le=16)
    temperature: float = Field(default=0.8, ge=0, le=2)
    seed: int = 0
    max_tokens: int = Field(default=64, ge=1, le=4096)
    concurrency: int = Field(default=4, ge=1, le=64)


def error_kind(text: str, sources: list[dict[str, Any]], gold: str, gold_doc: str) -> str | None:
    """What is wrong with one JSON answer (None: nothing)."""
    obj = scorers.parse_json_object(text)
    if obj is None or not scorers.json_compliant(text, JSON_ANSWER_SCHEMA):
        return "broken_json"
    value = str(obj["answer"])
    numbers = {s.get("id") for s in sources if s.get("doc_id") == gold_doc}
    if scorers.exact_match(value, gold):
        cited = set(obj["sources"])
        return None if cited and cited <= numbers else "wrong_citation"
    a, b = scorers.normalize_answer(value), scorers.normalize_answer(gold)
    if a and (a in b or difflib.SequenceMatcher(None, a, b).ratio() >= GARBLED):
        return "garbled_copy"
    return "wrong_value"


def _check_training_world(settings: LoraplexConfig, opts: PairOptions, registry: str) -> None:
    seed = world_seed(opts.questions)
    seeds = provenance.adapter_seeds(settings, registry)
    if seed is not None and seeds is not None and seed not in seeds:
        raise InputError(
            f"{opts.questions} is from world seed {seed}, which {registry} was not trained on "
            f"(seeds {', '.join(map(str, sorted(seeds)))}): pairs come from a training world "
            "only, so that no held-out question is trained on"
        )


def build_pairs(
    settings: LoraplexConfig, opts: PairOptions, progress: bool = True
) -> dict[str, Any]:
    """Ask, judge, write; the summary (counts by kind, the file and its sha256)."""
    from tqdm import tqdm

    if opts.out.exists():
        raise InputError(f"{opts.out} exists: choose another --out")
    registry = f"{opts.registry_name or opts.adapter}/{opts.version}"
    _check_training_world(settings, opts, registry)
    questions = [
        q
        for q in endpoint.load_questions(opts.questions, opts.split, opts.limit)
        if q.answer and q.gold_docs
    ]
    if not questions:
        raise InputError(f"{opts.questions}: no question has an answer and a gold document")
    url = opts.url or os.environ.get("LORAPLEX_URL") or "http://127.0.0.1:8000/v1"
    ep = endpoint.Endpoint(url, opts.api_key)
    models = {m["id"]: m for m in ep.models()}
    bases = [m for m, card in models.items() if (card.get("metadata") or {}).get("kind") == "base"]
    base = opts.base_model or (bases[0] if bases else "")
    model = f"{base}:{opts.adapter}"
    if model not in models:
        raise InputError(f"the endpoint has no adapter {model!r} (models: {', '.join(models)})")
    retrieval = {"collection": opts.collection, "top_k": opts.top_k, "mode": opts.mode}

    def ask(item: tuple[int, endpoint.Question]) -> tuple[endpoint.Question, Any]:
        import openai

        i, q = item
        try:
            r = ep.client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q.text}],
                max_tokens=opts.max_tokens,
                temperature=opts.temperature,
                n=opts.samples,
                seed=opts.seed + i,
                extra_body={
                    "task": "json_answer",
                    "retrieval": retrieval,
                    "adapter_version": opts.version,
                },
            )
        except openai.APIConnectionError as e:
            raise LoraplexError(f"the endpoint {url} stopped answering ({e})") from None
        except openai.APIStatusError as e:
            if e.status_code == 400:  # this question's request (e.g. past the context)
                return q, e.message
            raise LoraplexError(f"{model} answered {e.status_code}: {e.message}") from None
        return q, r

    pairs: list[dict[str, Any]] = []
    kinds: Counter[str] = Counter()
    answers = correct = not_retrieved = 0
    refused: list[str] = []
    pool = ThreadPoolExecutor(max_workers=opts.concurrency)
    try:
        with tqdm(
            total=len(questions), desc="sampling", unit="question", disable=not progress
        ) as bar:
            for q, r in pool.map(ask, enumerate(questions)):
                bar.update(1)
                if isinstance(r, str):
                    refused.append(f"{q.id}: {r}")
                    continue
                sources = (r.model_extra or {}).get("sources") or []
                gold_doc = next(
                    (d for d in q.gold_docs if any(s.get("doc_id") == d for s in sources)), None
                )
                if gold_doc is None:
                    not_retrieved += 1
                    continue
                number = next(s["id"] for s in sources if s.get("doc_id") == gold_doc)
                prompt = question_prompt(
                    q.text, [Source(s["doc_id"], s.get("text") or "") for s in sources], True
                )
                chosen = json_answer(q.answer or "", [number])
                seen: set[str] = set()
                for choice in r.choices:
                    answers += 1
                    text = (choice.message.content or "").strip()
                    kind = error_kind(text, sources, q.answer or "", gold_doc)
                    if kind is None:
                        correct += 1
                        continue
                    if text in seen or not text or text == chosen:
                        continue
                    seen.add(text)
                    kinds[kind] += 1
                    pairs.append(
                        {
                            "prompt": prompt,
                            "chosen": chosen,
                            "rejected": text,
                            "kind": kind,
                            "question": q.id,
                        }
                    )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if refused and len(refused) == len(questions):
        raise LoraplexError(f"every request was refused, e.g. {refused[0][:300]}")
    if not pairs:
        raise LoraplexError(
            f"the adapter answered all {answers} samples right: no pair to learn from "
            "(raise --temperature or --samples)"
        )
    body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    partial = opts.out.with_name(opts.out.name + ".partial")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(body, encoding="utf-8")
    partial.rename(opts.out)
    return {
        "out": str(opts.out),
        "sha256": hashlib.sha256(body.encode()).hexdigest(),
        "adapter": registry,
        "questions": len(questions),
        "answers": answers,
        "correct": correct,
        "gold_not_retrieved": not_retrieved,
        "refused": len(refused),
        "first_refusal": refused[0][:300] if refused else None,
        "pairs": len(pairs),
        "by_kind": {k: kinds.get(k, 0) for k in KINDS},
    }
