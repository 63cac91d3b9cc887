"""Writing a catalogue down as markdown knowledge documents with stable ids.

Owns: the three documents per product (overview, specifications, support), the
sentences that state each fact (every fact stated in exactly one document, so a
question has one gold document), the distractor prose around them, and company-wide
documents that state no product fact. Does not own: the facts (``catalog``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loraplex.world.catalog import ATTRIBUTES, Catalog, Product

# document kind -> the attributes it states
DOC_KINDS: dict[str, tuple[str, ...]] = {
    "overview": ("price", "release_year", "designer", "color"),
    "specs": ("weight", "battery_life", "factory", "model_code"),
    "support": ("warranty", "hotline"),
}
DOC_TITLES = {
    "overview": "{name} overview",
    "specs": "{name} specifications",
    "support": "{name} support",
}

# One canonical phrase per fact, "the <attribute> of the <product>", also used by every
# question: a model small enough to pretrain on two CPU cores learns to find that phrase
# in the sources and copy what follows; paraphrases cost it most of its accuracy.
FACT_SENTENCE = "The {label} of the {name} is {v}."

FILLER: dict[str, tuple[str, ...]] = {
    "overview": (
        "It belongs to the {family} line of {category} products.",
        "Reviewers often compare it with the {sibling}.",
        "The {family} line was made for people who want a simple {category}.",
        "Its case is made of recycled material.",
        "Many customers buy it as a gift.",
    ),
    "specs": (
        "All {family} models share the same charging port.",
        "The {sibling} uses a different board.",
        "Measurements were taken in the company test lab.",
        "The parts list is available on request.",
    ),
    "support": (
        "Keep the receipt to make a claim.",
        "Most problems are solved by a restart.",
        "The {sibling} has its own support page.",
        "Firmware updates are free for every {category}.",
    ),
}

COMPANY_DOCS = (
    (
        "shipping-policy",
        "Shipping policy",
        "Orders ship from the central warehouse of {company}. Tracking numbers are sent by "
        "email. Orders placed on a weekend ship on the next working day.",
    ),
    (
        "returns-policy",
        "Returns policy",
        "{company} accepts returns of unused products in their original box. Refunds go back "
        "to the card used for the order. Opened items are inspected before a refund.",
    ),
    (
        "about",
        "About {company}",
        "{company} designs {category} products and many other devices. The company "
        "publishes a support page and a specification sheet for every model it sells.",
    ),
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str  # markdown
    entity: str | None  # product name, or None for company documents
    kind: str
    facts: tuple[str, ...]  # attribute keys stated in this document


def doc_id(product: Product, kind: str) -> str:
    return f"{product.slug}-{kind}"


LABELS = {a.key: a.label for a in ATTRIBUTES}


def fact_sentence(product: Product, attribute: str) -> str:
    return FACT_SENTENCE.format(
        label=LABELS[attribute], name=product.name, v=product.facts[attribute]
    )


def product_documents(rng: random.Random, product: Product) -> list[Document]:
    docs = []
    for kind, attributes in DOC_KINDS.items():
        sibling = rng.choice(product.siblings) if product.siblings else product.name
        fill = [
            f.format(family=product.family, category=product.category, sibling=sibling)
            for f in rng.sample(FILLER[kind], 2)
        ]
        facts = [fact_sentence(product, a) for a in rng.sample(attributes, len(attributes))]
        title = DOC_TITLES[kind].format(name=product.name)
        text = f"# {title}\n\n" + " ".join(fill) + "\n\n" + "\n".join(f"- {f}" for f in facts)
        docs.append(
            Document(doc_id(product, kind), title, text, product.name, kind, tuple(attributes))
        )
    return docs


def catalog_documents(catalog: Catalog) -> list[Document]:
    rng = random.Random(f"documents:{catalog.stream}:{catalog.seed}")
    docs: list[Document] = []
    for product in catalog.products:
        docs.extend(product_documents(rng, product))
    category = catalog.products[0].category if catalog.products else "device"
    for slug, title, body in COMPANY_DOCS:
        t = title.format(company=catalog.company)
        text = f"# {t}\n\n" + body.format(company=catalog.company, category=category)
        docs.append(Document(f"company-{slug}", t, text, None, "company", ()))
    return docs
