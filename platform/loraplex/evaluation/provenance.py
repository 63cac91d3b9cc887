"""Which world an adapter learned from, and the rule that an evaluation never scores it
on that world.

Owns: finding the world seed of a data or questions file (the ``manifest.json`` of the
world folder it lies in), the tag a fine-tuning run carries (``loraplex.world_seeds``),
reading it back for an adapter the endpoint serves (registry alias or version -> run ->
tag), and :func:`check_unseen`, which refuses an evaluation whose questions come from a
world an evaluated adapter was trained on. Does not own: running the evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError

log = logging.getLogger(__name__)
SEEDS_TAG = "loraplex.world_seeds"


def world_seed(path: Path) -> int | None:
    """The seed of the generated world a file belongs to, or None (not a world's file)."""
    for folder in Path(path).absolute().parents:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                seed = json.loads(manifest.read_text()).get("seed")
            except (OSError, json.JSONDecodeError):
                return None
            return seed if isinstance(seed, int) else None
    return None


def seeds_tag(paths: Iterable[Path]) -> str:
    """The ``loraplex.world_seeds`` value for a run trained on ``paths`` ("" if none)."""
    seeds = {s for p in paths if (s := world_seed(p)) is not None}
    return ",".join(str(s) for s in sorted(seeds))


def adapter_seeds(settings: LoraplexConfig, registry_ref: str) -> set[int] | None:
    """The world seeds the version ``registry_ref`` (NAME@ALIAS or NAME/VERSION) points
    at now was trained on; None when the registry cannot say."""
    import mlflow

    from loraplex import tracking
    from loraplex.serving.config import parse_registry_ref

    try:
        name, alias, version = parse_registry_ref(registry_ref)
        tracking.setup(settings)
        client = mlflow.MlflowClient()
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, str(version))
        )
        tag = client.get_run(mv.run_id).data.tags.get(SEEDS_TAG) if mv.run_id else None
    except Exception as e:  # not in this registry, registry unreachable, no run
        log.info("no training provenance for %s (%s)", registry_ref, str(e).splitlines()[0][:120])
        return None
    if tag is None:
        return None
    return {int(s) for s in tag.split(",") if s.strip().isdigit()}


def check_unseen(
    settings: LoraplexConfig, questions: Path, models: list[dict[str, Any]], used: set[str]
) -> dict[str, list[int]]:
    """Adapter id -> training seeds, for every adapter among ``used`` model ids (directly
    or through a route); InputError when the questions' world is among them."""
    seed = world_seed(questions)
    cards = {m["id"]: m for m in models}
    adapters = set()
    for model in used:
        meta = (cards.get(model) or {}).get("metadata") or {}
        if meta.get("kind") == "adapter":
            adapters.add(model)
        elif meta.get("kind") == "route" and meta.get("adapter"):
            adapters.add(f"{meta.get('base')}:{meta['adapter']}")
    out: dict[str, list[int]] = {}
    for adapter in sorted(adapters):
        registry = ((cards.get(adapter) or {}).get("metadata") or {}).get("registry")
        seeds = adapter_seeds(settings, registry) if registry else None
        if seeds is None:
            continue
        out[adapter] = sorted(seeds)
        if seed is not None and seed in seeds:
            raise InputError(
                f"{questions} is from world seed {seed}, which adapter {adapter} ({registry}) "
                "was trained on: evaluate on a held-out world (`loraplex world generate --seed "
                "N`, N not in " + ", ".join(map(str, sorted(seeds))) + ")"
            )
    return out
