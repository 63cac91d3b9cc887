"""The facts of a fictional company's product catalogue, drawn at random per seed.

Owns: names (built from a fixed syllable inventory, so every seed's world tokenizes
into the same sub-words while no two seeds share facts), product families of
near-duplicate models ("Velmo X200", "Velmo X300"), and each product's attribute
values. Each attribute has a large value space so that a model that has not read the
passage answers by chance only rarely. Does not own: how facts are written down
(``documents``) or asked about (``tasks``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

SYLLABLES = (
    "zor",
    "vel",
    "mo",
    "ri",
    "dax",
    "lun",
    "ke",
    "pra",
    "sil",
    "ven",
    "tor",
    "ga",
    "nix",
    "bel",
    "ro",
    "fen",
    "cas",
    "mi",
    "dra",
    "lo",
    "pe",
    "zan",
    "quo",
    "sor",
    "ta",
    "bri",
    "kal",
    "jun",
    "wen",
    "ha",
    "ost",
    "ur",
    "tem",
    "vy",
    "sha",
    "po",
)
CATEGORIES = (
    "headphones",
    "router",
    "blender",
    "drone",
    "camera",
    "thermostat",
    "speaker",
    "kettle",
    "scanner",
    "projector",
    "keyboard",
    "lamp",
    "vacuum",
    "monitor",
    "printer",
    "watch",
)
COLORS = (
    "amber",
    "azure",
    "beige",
    "bronze",
    "charcoal",
    "coral",
    "crimson",
    "cyan",
    "emerald",
    "gold",
    "graphite",
    "indigo",
    "ivory",
    "jade",
    "lavender",
    "lime",
    "magenta",
    "maroon",
    "mint",
    "navy",
    "olive",
    "orange",
    "pearl",
    "plum",
    "rose",
    "ruby",
    "sand",
    "scarlet",
    "silver",
    "teal",
    "turquoise",
    "violet",
)
MODEL_LETTERS = "ABCDEKMRSTVXZ"


@dataclass(frozen=True)
class Attribute:
    key: str
    label: str  # how documents and questions name it


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("price", "price"),
    Attribute("release_year", "release year"),
    Attribute("designer", "designer"),
    Attribute("color", "color"),
    Attribute("weight", "weight"),
    Attribute("battery_life", "battery life"),
    Attribute("factory", "factory city"),
    Attribute("model_code", "model code"),
    Attribute("warranty", "warranty"),
    Attribute("hotline", "support extension"),
)
ATTRIBUTE_KEYS = tuple(a.key for a in ATTRIBUTES)


@dataclass
class Product:
    name: str  # "Velmo X200"
    family: str  # "Velmo"
    category: str
    facts: dict[str, str] = field(default_factory=dict)
    siblings: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Catalog:
    seed: int
    company: str
    products: list[Product]
    stream: str = "world"

    def by_name(self) -> dict[str, Product]:
        return {p.name: p for p in self.products}


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def _unique(rng: random.Random, make, taken: set[str]) -> str:
    for _ in range(1000):
        value = make()
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("name space exhausted")  # not reachable with the sizes used here


def _person(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {_word(rng, 3)}"


def draw_facts(
    rng: random.Random,
    designer: Callable[[], str] | None = None,
    factory: Callable[[], str] | None = None,
) -> dict[str, str]:
    """One product's facts, drawn in a fixed order (a seed's world depends on it).
    ``designer`` and ``factory`` draw those two (the catalogue keeps designers unique and
    factories among its cities); by default any name."""
    return {
        "price": f"{rng.randint(49, 999)} dollars",
        "release_year": str(rng.randint(1990, 2026)),
        "designer": designer() if designer else _person(rng),
        "color": rng.choice(COLORS),
        "weight": f"{rng.randint(120, 2400)} grams",
        "battery_life": f"{rng.randint(4, 96)} hours",
        "factory": factory() if factory else _word(rng, rng.choice((2, 3))),
        "model_code": f"{rng.choice(MODEL_LETTERS)}{rng.choice(MODEL_LETTERS)}-"
        f"{rng.randint(1000, 9999)}",
        "warranty": f"{rng.randint(6, 60)} months",
        "hotline": f"extension {rng.randint(100, 999)}",
    }


def draw_catalog(
    seed: int,
    n_families: int = 14,
    models_per_family: tuple[int, int] = (2, 4),
    taken_names: set[str] | None = None,
    stream: str = "world",
) -> Catalog:
    """A catalogue for ``seed``. ``stream`` separates independent draws from one seed
    (the world's products and the base model's pretraining products), and
    ``taken_names`` keeps their names apart."""
    rng = random.Random(f"{stream}:{seed}")
    taken: set[str] = set(taken_names or ())
    company = _word(rng, 2) + " " + rng.choice(("Devices", "Labs", "Works", "Systems"))
    people: set[str] = set()
    cities = [_word(rng, rng.choice((2, 3))) for _ in range(40)]
    products: list[Product] = []
    for _ in range(n_families):
        family = _unique(rng, lambda: _word(rng, 2), taken)
        category = rng.choice(CATEGORIES)
        letter = rng.choice(MODEL_LETTERS)
        numbers = rng.sample(range(1, 10), rng.randint(*models_per_family))
        names = [f"{family} {letter}{n}00" for n in sorted(numbers)]
        for name in names:
            taken.add(name)
            p = Product(
                name=name,
                family=family,
                category=category,
                siblings=[s for s in names if s != name],
            )
            p.facts = draw_facts(
                rng,
                designer=lambda: _unique(rng, lambda: _person(rng), people),
                factory=lambda: rng.choice(cities),
            )
            products.append(p)
    return Catalog(seed=seed, company=company, products=products, stream=stream)
