"""What is asked of a model in the world: fact questions, support tickets, and the
training examples built from them.

Owns: question templates and gold answers, the train/test split (by product, so test
questions are about products no training example mentions), support tickets with
fixed categories, and the example builders: JSON answers, RAFT-style answers over
retrieved passages with distractors, and reading-comprehension conversations for the
base model (plain answers citing a source number, never JSON, never tickets).
Does not own: the prompt text (``loraplex.prompts``) or file formats (``loraplex.data``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from loraplex.prompts import (
    NOT_FOUND,
    TICKET_CATEGORIES,
    Source,
    json_answer,
    question_prompt,
    ticket_prompt,
)
from loraplex.world.catalog import ATTRIBUTE_KEYS, Catalog, Product, draw_facts
from loraplex.world.documents import DOC_KINDS, LABELS, Document, doc_id, fact_sentence

# Every question names the fact with the documents' phrase, "the <attribute> of the <product>".
QUESTION_TEMPLATES = ("What is the {label} of the {name}?", "Tell me the {label} of the {name}.")
ATTRIBUTE_DOC_KIND = {a: kind for kind, attrs in DOC_KINDS.items() for a in attrs}

TICKET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {name}.",
        "The invoice for the {name} shows the wrong amount.",
        "My card was billed but the order for the {name} was cancelled.",
        "Why is there an extra fee on my bill for the {name}?",
    ),
    "shipping": (
        "My {name} has not arrived yet.",
        "The tracking number for my {name} does not work.",
        "The {name} was delivered to the wrong address.",
        "When will my {name} be shipped?",
    ),
    "defect": (
        "My {name} stopped working after two days.",
        "The {name} makes a loud noise when I turn it on.",
        "The {name} gets very hot and then shuts down.",
        "The button on my {name} is broken.",
    ),
    "account": (
        "I cannot log in to register my {name}.",
        "Please change the email address on my account.",
        "I forgot the password of my account.",
        "My account was locked after I added the {name}.",
    ),
    "how-to": (
        "How do I pair the {name} with my phone?",
        "How do I reset the {name} to factory settings?",
        "Where do I find the settings menu on the {name}?",
        "How do I update the firmware of the {name}?",
    ),
    "returns": (
        "I want to return my {name}.",
        "Can I send back the {name} I bought last week?",
        "How do I get a refund for the {name}?",
        "The {name} is not what I wanted, I would like to return it.",
    ),
}
TICKET_OPENERS = ("", "Hello, ", "Hi team, ", "Good morning. ", "Hi, ")
TICKET_CLOSERS = ("", " Thanks.", " Please help.", " This is urgent.", " Regards, a customer.")


@dataclass(frozen=True)
class Question:
    qid: str
    text: str
    answer: str
    entity: str
    attribute: str
    gold_doc: str
    split: str  # "train" | "test"


@dataclass(frozen=True)
class Ticket:
    tid: str
    text: str
    category: str
    split: str


def question_text(rng: random.Random, product: Product, attribute: str) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(label=LABELS[attribute], name=product.name)


def split_products(catalog: Catalog, test_fraction: float = 0.2) -> dict[str, str]:
    """product name -> "train" | "test", drawn per seed; at least one of each."""
    rng = random.Random(f"split:{catalog.seed}")
    names = [p.name for p in catalog.products]
    n_test = max(1, round(len(names) * test_fraction))
    test = set(rng.sample(names, n_test))
    return {n: ("test" if n in test else "train") for n in names}


def make_questions(catalog: Catalog) -> list[Question]:
    rng = random.Random(f"questions:{catalog.seed}")
    split = split_products(catalog)
    out = []
    for p in catalog.products:
        for attribute in ATTRIBUTE_KEYS:
            text = question_text(rng, p, attribute)
            out.append(
                Question(
                    qid=f"q-{p.slug}-{attribute.replace('_', '-')}",
                    text=text,
                    answer=p.facts[attribute],
                    entity=p.name,
                    attribute=attribute,
                    gold_doc=doc_id(p, ATTRIBUTE_DOC_KIND[attribute]),
                    split=split[p.name],
                )
            )
    return out


def make_tickets(catalog: Catalog, n: int = 600, test_fraction: float = 0.2) -> list[Ticket]:
    rng = random.Random(f"tickets:{catalog.seed}")
    names = [p.name for p in catalog.products]
    out = []
    for i in range(n):
        category = TICKET_CATEGORIES[i % len(TICKET_CATEGORIES)]
        body = rng.choice(TICKET_TEMPLATES[category]).format(name=rng.choice(names))
        text = rng.choice(TICKET_OPENERS) + body + rng.choice(TICKET_CLOSERS)
        split = "test" if rng.random() < test_fraction else "train"
        out.append(Ticket(f"t-{catalog.seed}-{i:04d}", text, category, split))
    return out


def as_source(doc: Document) -> Source:
    return Source(doc.doc_id, doc.text)


def distractors(
    rng: random.Random, q: Question, docs: dict[str, Document], products: dict[str, Product], k: int
) -> list[Document]:
    """Hard negatives first: the same kind of document for a sibling model, then the
    product's other documents, then any product document."""
    product = products[q.entity]
    kind = ATTRIBUTE_DOC_KIND[q.attribute]
    hard = [docs[doc_id(products[s], kind)] for s in product.siblings]
    same = [docs[doc_id(product, k2)] for k2 in DOC_KINDS if k2 != kind]
    rng.shuffle(hard)
    rng.shuffle(same)
    pool = hard + same
    others = [d for d in docs.values() if d.entity and d.doc_id != q.gold_doc and d not in pool]
    pool += rng.sample(others, min(k, len(others)))
    return pool[:k]


def json_example(q: Question, docs: dict[str, Document]) -> list[dict[str, str]]:
    """The JSON-answer behaviour: gold passage in the prompt, a JSON object out."""
    return _json_conversation(q.text, [as_source(docs[q.gold_doc])], q.answer, 1)


P_CLOSED_BOOK = 1 / 3


def json_examples(
    rng: random.Random,
    q: Question,
    docs: dict[str, Document],
    products: dict[str, Product],
) -> list[list[dict[str, str]]]:
    """Three JSON-answer examples of one question, so that a small adapter learns to read
    the answer from the source rather than recall the answers it was trained on: the
    question as written with its document; then, with the product's facts replaced by
    freshly drawn ones (counterfactual documents: the answer can only come from the
    source), the question asked the other way over a few of the document's fact lines,
    and over the whole document beside a sibling product's document, citing its number.
    For a share ``P_CLOSED_BOOK`` of the questions, a fourth without sources (the answer
    from memory, ``"sources": []``), so the format holds when retrieval is off.
    """
    product, gold = products[q.entity], docs[q.gold_doc]
    other = [t for t in QUESTION_TEMPLATES if t.format(**_fields(q)) != q.text]
    rephrased = other[0].format(**_fields(q)) if other else q.text

    twin = replace(product, facts=draw_facts(rng))
    lines = [a for a in gold.facts if a != q.attribute]
    chosen = [q.attribute, *rng.sample(lines, rng.randint(0, min(2, len(lines))))]
    rng.shuffle(chosen)
    snippet = Source(gold.doc_id, "\n".join(f"- {fact_sentence(twin, a)}" for a in chosen))
    twin2 = replace(product, facts=draw_facts(rng))
    text = gold.text
    for a in gold.facts:
        text = text.replace(fact_sentence(product, a), fact_sentence(twin2, a))
    gold2 = replace(gold, text=text)
    pair = [gold2, *distractors(rng, q, docs, products, 1)]
    rng.shuffle(pair)
    examples = [
        json_example(q, docs),
        _json_conversation(rephrased, [snippet], twin.facts[q.attribute], 1),
        _json_conversation(
            q.text, [as_source(d) for d in pair], twin2.facts[q.attribute], 1 + pair.index(gold2)
        ),
    ]
    if rng.random() < P_CLOSED_BOOK:  # no sources: the format alone, answered from memory
        examples.append(_json_conversation(rephrased, [], q.answer, None))
    return examples


def _fields(q: Question) -> dict[str, str]:
    return {"label": LABELS[q.attribute], "name": q.entity}


def _json_conversation(
    question: str, sources: list[Source], answer: str, cited: int | None
) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": question_prompt(question, sources, json_answer=True)},
        {"role": "assistant", "content": json_answer(answer, [] if cited is None else [cited])},
    ]


def raft_example(
    rng: random.Random,
    q: Question,
    docs: dict[str, Document],
    products: dict[str, Product],
    k: int = 3,
    p_gold: float = 0.8,
) -> list[dict[str, str]]:
    """RAFT: k retrieved passages, the gold one among them with probability p_gold;
    without it the right answer is that the sources do not say."""
    chosen = distractors(rng, q, docs, products, k)
    with_gold = rng.random() < p_gold
    if with_gold:
        chosen = [*chosen[: k - 1], docs[q.gold_doc]]
    rng.shuffle(chosen)
    prompt = question_prompt(q.text, [as_source(d) for d in chosen], json_answer=True)
    if with_gold:
        target = json_answer(q.answer, [1 + [d.doc_id for d in chosen].index(q.gold_doc)])
    else:
        target = json_answer(NOT_FOUND, [])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]


def ticket_example(t: Ticket) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": ticket_prompt(t.text)},
        {"role": "assistant", "content": t.category},
    ]


def reading_conversation(
    rng: random.Random,
    product: Product,
    docs: dict[str, Document],
    products: dict[str, Product],
    max_turns: int = 4,
    p_snippet: float = 0.5,
) -> list[dict[str, str]]:
    """Base-model pretraining: sources, then several questions whose answers are copied
    from them, each citing its source number. A source is a whole document or, with
    probability ``p_snippet``, a few of its fact lines: short contexts are where a small
    model first learns to look things up; whole documents are where it must use it."""
    kind = rng.choice(list(DOC_KINDS))
    chosen = [product]
    if product.siblings and rng.random() < 0.5:
        chosen.append(products[rng.choice(product.siblings)])
        rng.shuffle(chosen)
    snippet = rng.random() < p_snippet
    sources, asked = [], []
    for number, p in enumerate(chosen, 1):
        doc = docs[doc_id(p, kind)]
        attributes = list(doc.facts)
        if snippet:
            attributes = rng.sample(attributes, rng.randint(1, min(3, len(attributes))))
            text = "\n".join(f"- {fact_sentence(p, a)}" for a in attributes)
            sources.append(Source(doc.doc_id, text))
        else:
            sources.append(as_source(doc))
        asked += [(p, a, number) for a in attributes]
    rng.shuffle(asked)
    messages: list[dict[str, str]] = []
    for n, (p, attribute, number) in enumerate(asked[:max_turns]):
        question = question_text(rng, p, attribute)
        content = question_prompt(question, sources) if n == 0 else f"Question: {question}"
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": f"{p.facts[attribute]} [{number}]"},
        ]
    return messages
