"""Reading a generated world's manifest back: which world a file belongs to.

Owns: the manifest's file name, finding the world seed of a data or questions file (the
``manifest.json`` of the world folder it lies in) and the value of the ``world_seeds``
tag a fine-tuning run carries (the seeds of the worlds it was trained on). Does not own:
writing the manifest (``generate``) or the rule that an evaluation never scores an
adapter on its own training world (``evaluation.provenance``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"


def world_seed(path: Path) -> int | None:
    """The seed of the generated world a file belongs to, or None (not a world's file)."""
    for folder in Path(path).absolute().parents:
        manifest = folder / MANIFEST
        if manifest.is_file():
            try:
                seed = json.loads(manifest.read_text()).get("seed")
            except (OSError, json.JSONDecodeError):
                return None
            return seed if isinstance(seed, int) else None
    return None


def seeds_tag(paths: Iterable[Path]) -> str:
    """The ``world_seeds`` tag's value for a run trained on ``paths`` ("" if none)."""
    seeds = {s for p in paths if (s := world_seed(p)) is not None}
    return ",".join(str(s) for s in sorted(seeds))
