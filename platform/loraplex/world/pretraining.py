"""The base model's pretraining text: domain prose and reading-comprehension
conversations, all about products that are not in the world's catalogue.

Owns: drawing a separate catalogue (its own random stream, names kept apart from
the world's) and turning it into records, each tagged with the curriculum stage it
serves:

- ``copy``: "Repeat the text." conversations, dense in tokens to copy, where a small
  model first forms the attention heads that copy from its context (some of the texts
  are JSON records, as a real base model has seen JSON);
- ``lookup``: one fact line as the source and a question about it, the smallest
  look-up;
- ``snippet`` / ``document``: reading conversations over a few fact lines or over
  whole documents, several questions each (every answer is a look-up to learn from);
- ``prose``: documents as plain text.

Nothing here asks for a JSON reply (JSON is only ever text to repeat) or teaches the
ticket categories, and no fact of the world (train or test) appears in it.
Does not own: tokenization or training (``loraplex.basemodel``).
"""

from __future__ import annotations

import json
import random
from typing import Any

from loraplex.prompts import Source, question_prompt
from loraplex.world.catalog import ATTRIBUTE_KEYS, Catalog, Product, draw_catalog
from loraplex.world.documents import catalog_documents, doc_id, fact_sentence
from loraplex.world.tasks import ATTRIBUTE_DOC_KIND, question_text, reading_conversation

P_JSON_TEXT = 0.2


def copy_conversation(rng: random.Random, product: Product) -> list[dict[str, str]]:
    """Fact sentences to repeat or, with probability ``P_JSON_TEXT``, a JSON record of
    them (a catalogue entry or a question-answer log line): a base model has seen JSON,
    so its output layer knows the punctuation and keys an adapter will ask for."""
    attributes = rng.sample(ATTRIBUTE_KEYS, rng.randint(1, 3))
    if rng.random() < P_JSON_TEXT:
        text = json_record(rng, product, attributes)
    else:
        text = " ".join(fact_sentence(product, a) for a in attributes)
    return [
        {"role": "user", "content": f"Repeat the text.\n\nText: {text}"},
        {"role": "assistant", "content": text},
    ]


def json_record(rng: random.Random, product: Product, attributes: list[str]) -> str:
    if rng.random() < 0.5:
        record: dict[str, Any] = {"name": product.name}
        record |= {a: product.facts[a] for a in attributes}
    else:
        record = {
            "question": question_text(rng, product, attributes[0]),
            "answer": product.facts[attributes[0]],
            "sources": sorted(rng.sample(range(1, 6), rng.randint(0, 2))),
        }
    return json.dumps(record, ensure_ascii=False)


def lookup_conversation(
    rng: random.Random, product: Product, attribute: str
) -> list[dict[str, str]]:
    source = Source(
        doc_id(product, ATTRIBUTE_DOC_KIND[attribute]), f"- {fact_sentence(product, attribute)}"
    )
    question = question_text(rng, product, attribute)
    return [
        {"role": "user", "content": question_prompt(question, [source])},
        {"role": "assistant", "content": f"{product.facts[attribute]} [1]"},
    ]


STAGES = ("copy", "lookup", "snippet", "document", "prose")
DEFAULT_COUNTS = {"copy": 28000, "lookup": 5000, "snippet": 16000, "document": 6000, "prose": 2000}


def pretraining_records(
    world: Catalog, counts: dict[str, int] | None = None, turns: int = 6
) -> list[dict[str, Any]]:
    """Records per stage (``counts``), each about a product family drawn afresh (names
    and facts) for that record alone, so no fact appears twice: a model cannot lower
    its loss by memorising facts, only by reading the context in front of it.

    ``snippet``: a few fact lines of one or two sibling products and up to ``turns``
    questions about them; ``document``: the same over whole documents (title, filler
    prose, fact lines), the form retrieval hands a model; ``prose``: a document alone."""
    unknown = set(counts or {}) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown pretraining stages {sorted(unknown)}; use {STAGES}")
    counts = dict(DEFAULT_COUNTS) if counts is None else {s: counts.get(s, 0) for s in STAGES}
    taken = {p.name for p in world.products} | {p.family for p in world.products}
    rng = random.Random(f"pretraining:{world.seed}")
    records: list[dict[str, Any]] = []
    plan = [stage for stage in STAGES for _ in range(counts[stage])]
    for i, stage in enumerate(plan):
        family = draw_catalog(world.seed, n_families=1, taken_names=taken, stream=f"pretrain-{i}")
        product = rng.choice(family.products)
        if stage == "copy":
            records.append({"stage": stage, "messages": copy_conversation(rng, product)})
            continue
        if stage == "lookup":
            attribute = rng.choice(ATTRIBUTE_KEYS)
            messages = lookup_conversation(rng, product, attribute)
            records.append({"stage": stage, "messages": messages})
            continue
        docs = {d.doc_id: d for d in catalog_documents(family) if d.entity}
        if stage == "prose":
            records.append({"stage": stage, "text": rng.choice(list(docs.values())).text})
            continue
        messages = reading_conversation(
            rng,
            product,
            docs,
            family.by_name(),
            max_turns=turns,
            p_snippet=1.0 if stage == "snippet" else 0.0,
        )
        records.append({"stage": stage, "messages": messages})
    rng.shuffle(records)
    return records
