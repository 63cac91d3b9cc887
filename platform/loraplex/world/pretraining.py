"""The base model's pretraining text: domain prose and reading-comprehension
conversations, all about products that are not in the world's catalogue.

Owns: drawing a separate catalogue (its own random stream, names kept apart from
the world's) and turning it into records: ``{"text": ...}`` for prose and
``{"messages": [...]}`` for conversations whose answers are copied from the sources in
the prompt. Nothing here teaches the JSON format or the ticket categories, and no
fact of the world (train or test) appears in it. Does not own: tokenization or
training (``loraplex.basemodel``).
"""

from __future__ import annotations

import random
from typing import Any

from loraplex.world.catalog import Catalog, draw_catalog
from loraplex.world.documents import catalog_documents
from loraplex.world.tasks import reading_conversation


def pretraining_catalog(world: Catalog, n_families: int) -> Catalog:
    taken = {p.name for p in world.products} | {p.family for p in world.products}
    return draw_catalog(world.seed, n_families=n_families, taken_names=taken, stream="pretrain")


def pretraining_records(
    world: Catalog, n_families: int = 160, conversations_per_product: int = 8
) -> list[dict[str, Any]]:
    catalog = pretraining_catalog(world, n_families)
    docs = {d.doc_id: d for d in catalog_documents(catalog)}
    products = catalog.by_name()
    rng = random.Random(f"pretraining:{world.seed}")
    records: list[dict[str, Any]] = [{"text": d.text} for d in docs.values()]
    for product in catalog.products:
        for _ in range(conversations_per_product):
            records.append({"messages": reading_conversation(rng, product, docs, products)})
    rng.shuffle(records)
    return records
