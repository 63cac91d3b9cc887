"""The base model's pretraining text: domain prose and reading-comprehension
conversations, all about products that are not in the world's catalogue.

Owns: drawing a separate catalogue (its own random stream, names kept apart from
the world's) and turning it into records, each tagged with the curriculum stage it
serves:

- ``copy``: "Repeat the text." conversations, dense in tokens to copy, where a small
  model first forms the attention heads that copy from its context;
- ``lookup``: one fact line as the source and a question about it, the smallest
  look-up;
- ``read``: prose (``{"text"}``) and reading conversations over whole documents or
  snippets, with several questions each.
 Nothing here teaches the JSON format or the ticket categories, and no
fact of the world (train or test) appears in it. Does not own: tokenization or
training (``loraplex.basemodel``).
"""

from __future__ import annotations

import random
from typing import Any

from loraplex.prompts import Source, question_prompt
from loraplex.world.catalog import ATTRIBUTE_KEYS, Catalog, Product, draw_catalog
from loraplex.world.documents import catalog_documents, doc_id, fact_sentence
from loraplex.world.tasks import ATTRIBUTE_DOC_KIND, question_text, reading_conversation


def copy_conversation(rng: random.Random, product: Product) -> list[dict[str, str]]:
    attributes = rng.sample(ATTRIBUTE_KEYS, rng.randint(1, 3))
    text = " ".join(fact_sentence(product, a) for a in attributes)
    return [
        {"role": "user", "content": f"Repeat the text.\n\nText: {text}"},
        {"role": "assistant", "content": text},
    ]


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


def pretraining_records(
    world: Catalog, copy: int = 12000, lookup: int = 20000, read: int = 12000
) -> list[dict[str, Any]]:
    """``copy``/``lookup``/``read`` records, each about a product family drawn afresh
    (names and facts) for that record alone, so no fact appears twice: a model cannot
    lower its loss by memorising facts, only by reading the context in front of it.
    Each read record comes with one of its family's documents as prose."""
    taken = {p.name for p in world.products} | {p.family for p in world.products}
    rng = random.Random(f"pretraining:{world.seed}")
    records: list[dict[str, Any]] = []
    for i, stage in enumerate(["copy"] * copy + ["lookup"] * lookup + ["read"] * read):
        family = draw_catalog(world.seed, n_families=1, taken_names=taken, stream=f"pretrain-{i}")
        product = rng.choice(family.products)
        if stage == "copy":
            records.append({"stage": stage, "messages": copy_conversation(rng, product)})
        elif stage == "lookup":
            attribute = rng.choice(ATTRIBUTE_KEYS)
            records.append(
                {"stage": stage, "messages": lookup_conversation(rng, product, attribute)}
            )
        else:
            docs = {d.doc_id: d for d in catalog_documents(family) if d.entity}
            records.append({"stage": stage, "text": rng.choice(list(docs.values())).text})
            records.append(
                {
                    "stage": stage,
                    "messages": reading_conversation(rng, product, docs, family.by_name()),
                }
            )
    rng.shuffle(records)
    return records
