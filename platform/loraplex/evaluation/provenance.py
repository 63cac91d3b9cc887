"""Which world an adapter learned from, and the rule that an evaluation never scores it
on that world.

Owns: reading the world seeds a fine-tuning run was tagged with back for an adapter the
endpoint serves (registry alias or version -> run -> ``world_seeds`` tag; the seeds of a
file come from ``world.manifest``), and :func:`check_unseen`, which refuses an
evaluation whose questions come from a world an evaluated adapter was trained on; and the
lineage the other way: :func:`preference_columns`, the preference-tuned version (DPO,
ORPO) of the served adapter that the four-way evaluation adds as its fifth column. Does
not own: running the evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loraplex import tracking
from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, first_line
from loraplex.evaluation.endpoint import default_base
from loraplex.models import tags
from loraplex.models.adapters import parse_registry_ref
from loraplex.world.manifest import world_seed

log = logging.getLogger(__name__)


def _registry_version(settings: LoraplexConfig, registry_ref: str):
    """(client, the model version ``registry_ref`` (NAME@ALIAS or NAME/VERSION) points at
    now); raises when the registry has no such version or cannot be reached."""
    import mlflow  # heavy (seconds): imported when an evaluation reads the registry

    name, alias, version = parse_registry_ref(registry_ref)
    tracking.setup(settings)
    client = mlflow.MlflowClient()
    if alias:
        return client, client.get_model_version_by_alias(name, alias)
    return client, client.get_model_version(name, str(version))


def adapter_seeds(settings: LoraplexConfig, registry_ref: str) -> set[int] | None:
    """The world seeds the version ``registry_ref`` (NAME@ALIAS or NAME/VERSION) points
    at now was trained on; None when the registry cannot say."""
    try:
        client, mv = _registry_version(settings, registry_ref)
        tag = client.get_run(mv.run_id).data.tags.get(tags.WORLD_SEEDS) if mv.run_id else None
    except Exception as e:  # not in this registry, registry unreachable, no run
        log.info("no training provenance for %s (%s)", registry_ref, first_line(e, 120))
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


def preference_child(settings: LoraplexConfig, registry_ref: str) -> str | None:
    """The newest version of the same registered adapter that a preference run (DPO,
    ORPO) started from the version ``registry_ref`` points at now; None when there is none
    or the registry cannot say."""
    try:
        client, current = _registry_version(settings, registry_ref)
        parent = f"{current.name}/{current.version}"
        # the registry filters on the tag: one page however many versions the name holds
        found = client.search_model_versions(
            f"name='{current.name}' and tags.`{tags.PARENT_VERSION}` = '{parent}'"
        )
        children = [int(mv.version) for mv in found if mv.tags.get(tags.METHOD) in ("dpo", "orpo")]
    except Exception as e:  # not in this registry, registry unreachable
        log.info("no preference lineage for %s (%s)", registry_ref, first_line(e, 120))
        return None
    return str(max(children)) if children else None


def preference_columns(
    settings: LoraplexConfig,
    names: list[str],
    models: list[dict[str, Any]],
    base: str | None,
    adapter: str,
) -> list[str]:
    """The four-way evaluation's fifth column: ``adapter/N+rag`` when the configurations
    hold ``adapter+rag`` and pin no version, and the registry holds a preference-tuned
    version N that started from the version the endpoint's adapter serves now (the
    newest such); else nothing."""
    if "adapter+rag" not in names or any("/" in n for n in names):
        return []
    card = {m["id"]: m for m in models}.get(f"{default_base(models, base)}:{adapter}") or {}
    registry = (card.get("metadata") or {}).get("registry")
    child = preference_child(settings, registry) if registry else None
    if child is None:
        return []
    log.info(
        "%s has a preference-tuned version %s started from the one served: evaluated beside it",
        registry,
        child,
    )
    return [f"adapter/{child}+rag"]
