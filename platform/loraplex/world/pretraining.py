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

STAGES = ("copy", "lookup", "read")


def pretraining_catalog(world: Catalog, n_families: int) -> Catalog:
    taken = {p.name for p in world.products} | {p.family for p in world.products}
    return draw_catalog(world.seed, n_families=n_families, taken_names=taken, stream="pretrain")


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
    world: Catalog,
    n_families: int = 160,
    conversations_per_product: int = 8,
    copies_per_product: int = 6,
) -> list[dict[str, Any]]:
    catalog = pretraining_catalog(world, n_families)
    docs = {d.doc_id: d for d in catalog_documents(catalog)}
    products = catalog.by_name()
    rng = random.Random(f"pretraining:{world.seed}")
    records: list[dict[str, Any]] = [{"stage": "read", "text": d.text} for d in docs.values()]
    for product in catalog.products:
        records += [
            {"stage": "read", "messages": reading_conversation(rng, product, docs, products)}
            for _ in range(conversations_per_product)
        ]
        records += [
            {"stage": "lookup", "messages": lookup_conversation(rng, product, a)}
            for a in ATTRIBUTE_KEYS
        ]
        records += [
            {"stage": "copy", "messages": copy_conversation(rng, product)}
            for _ in range(copies_per_product)
        ]
    rng.shuffle(records)
    return records
