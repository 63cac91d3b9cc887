"""``loraplex world generate``: write one seed's world to a folder, atomically.

Owns: the folder layout below, the manifest, and the rule that nothing existing is
overwritten: the world is written to a temporary sibling folder and renamed into place,
an existing non-empty folder is refused unless ``force``, and then replaced only once
the new one is complete. Does not own: the content (``catalog``, ``documents``,
``tasks``, ``pretraining``).

Layout::

    manifest.json                      seed, counts, files
    docs/<doc_id>.md                   knowledge documents (for `loraplex ingest`)
    corpus.jsonl queries.jsonl         BEIR layout: _id/title/text, _id/text/metadata
    qrels/train.tsv qrels/test.tsv     query-id, corpus-id, score
    tickets.jsonl                      support tickets with their category and split
    datasets/<task>/<split>.<format>.jsonl
        json_answer      gold passage -> {"answer", "sources"} (train: 3-4 per question)
        ticket_classify  ticket -> category
        raft_json        retrieved passages with distractors -> {"answer", "sources"}
        (format: alpaca | sharegpt | openai)
    pretrain/corpus.jsonl              base-model text: {"text"} prose, {"messages"} reading
                                       (only with ``pretraining=True``: what bootstrap reads)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.data.formats import write_conversations, write_jsonl
from loraplex.errors import InputError
from loraplex.folders import replace_folder, staging_folder
from loraplex.world.catalog import draw_catalog
from loraplex.world.documents import catalog_documents
from loraplex.world.pretraining import pretraining_records
from loraplex.world.tasks import (
    json_example,
    json_examples,
    make_questions,
    make_tickets,
    raft_example,
    ticket_example,
)

# 2: JSON answers cite source numbers (``"sources": [1]``), not doc ids; three or four
#    JSON-answer training examples per question; JSON records in the pretraining text
WORLD_VERSION = 3  # 3: the prompt layout with the question first (prompts.PROMPT_LAYOUT 2)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class WorldSize:
    families: int = 14
    tickets: int = 600
    pretrain: dict[str, int] | None = None  # records per stage; None: DEFAULT_COUNTS


def is_current(root: Path) -> bool:
    """Whether ``root`` holds a complete world written by this version of loraplex.

    A world of an older version has the same documents for its seed but older task
    datasets (and pretraining text); bootstrap regenerates it and keeps the base model."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("world_version") == WORLD_VERSION


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse a folder that holds something (unless force) or that cannot be written."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty (use --force to replace it)")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {probe} (permission denied)")


def generate_world(
    seed: int,
    out: Path,
    force: bool = False,
    size: WorldSize | None = None,
    pretraining: bool = False,
) -> dict[str, Any]:
    """Write the world of ``seed`` to ``out``. ``pretraining``: also the base model's
    pretraining text (about 90% of the time: 57,000 families drawn afresh); only the
    world a base model is bootstrapped from needs it. Its random stream is its own, so
    everything else is the same with or without it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, not {seed!r}")
    size = size or WorldSize()
    out = out.expanduser().absolute()
    check_output_folder(out, force)
    staging = staging_folder(out)
    try:
        manifest = _write_world(seed, staging, size, pretraining)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_world(seed: int, root: Path, size: WorldSize, pretraining: bool) -> dict[str, Any]:
    catalog = draw_catalog(seed, n_families=size.families)
    docs = catalog_documents(catalog)
    by_id = {d.doc_id: d for d in docs}
    products = catalog.by_name()
    questions = make_questions(catalog)
    tickets = make_tickets(catalog, n=size.tickets)

    (root / "docs").mkdir()
    for d in docs:
        (root / "docs" / f"{d.doc_id}.md").write_text(d.text + "\n", encoding="utf-8")
    write_jsonl(
        root / "corpus.jsonl",
        (
            {
                "_id": d.doc_id,
                "title": d.title,
                "text": d.text,
                "metadata": {"entity": d.entity, "kind": d.kind},
            }
            for d in docs
        ),
    )
    write_jsonl(
        root / "queries.jsonl",
        (
            {
                "_id": q.qid,
                "text": q.text,
                "metadata": {
                    "answer": q.answer,
                    "entity": q.entity,
                    "attribute": q.attribute,
                    "gold_doc": q.gold_doc,
                    "split": q.split,
                },
            }
            for q in questions
        ),
    )
    (root / "qrels").mkdir()
    for split in SPLITS:
        rows = ["query-id\tcorpus-id\tscore"]
        rows += [f"{q.qid}\t{q.gold_doc}\t1" for q in questions if q.split == split]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_jsonl(
        root / "tickets.jsonl",
        ({"_id": t.tid, "text": t.text, "category": t.category, "split": t.split} for t in tickets),
    )

    rng = random.Random(f"datasets:{seed}")
    json_rng = random.Random(f"json-answer:{seed}")
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        qs = [q for q in questions if q.split == split]
        tasks = {
            "json_answer": (
                [c for q in qs for c in json_examples(json_rng, q, by_id, products)]
                if split == "train"
                else [json_example(q, by_id) for q in qs]
            ),
            "ticket_classify": [ticket_example(t) for t in tickets if t.split == split],
            "raft_json": [raft_example(rng, q, by_id, products) for q in qs],
        }
        for task, conversations in tasks.items():
            rows = write_conversations(root / "datasets" / task, split, conversations)
            counts.setdefault(task, {})[split] = rows["openai"]

    pretrain = pretraining_records(catalog, size.pretrain) if pretraining else []
    if pretraining:
        write_jsonl(root / "pretrain" / "corpus.jsonl", pretrain)

    manifest = {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "company": catalog.company,
        "products": len(catalog.products),
        "documents": len(docs),
        "questions": {s: sum(q.split == s for q in questions) for s in SPLITS},
        "tickets": {s: sum(t.split == s for t in tickets) for s in SPLITS},
        "datasets": counts,
        "pretrain_records": len(pretrain),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
