"""Adapters in the MLflow model registry: one registered model per adapter name, one
version per training run (or registered folder), aliases such as ``candidate`` and
``production``.

Owns: logging a PEFT folder as the run's ``adapter`` artifact and registering it with
tags that link the run and the base model (:func:`log_and_register`), listing adapters
with their versions, aliases, base, rank and metrics, moving aliases, and validating an
adapter trained elsewhere before it is registered (files complete, loadable tensors,
base model matches, target modules exist in the base, rank within the serving maximum).
Does not own: training (``job``) or serving's adapter loading.

Conventions (tags on each model version): ``loraplex.base_model`` (the base reference),
``loraplex.lora_rank``, ``loraplex.run_id``; the artifact path is ``adapter``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.models import tags
from loraplex.models.resolve import meta_model, resolve_base_model
from loraplex.models.search import all_registered_models, all_versions

ARTIFACT = "adapter"
REGISTRY_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[1-9][0-9]{0,8}))$"
)
MAX_SERVING_RANK = 64
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def parse_registry_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``name@alias`` -> (name, alias, None); ``name/3`` -> (name, None, '3')."""
    m = REGISTRY_REF.match(ref)
    if not m:
        raise ValueError(
            f"{ref!r} is not a registry reference: use NAME@ALIAS (json-answer@production) "
            "or NAME/VERSION (json-answer/3)"
        )
    return m["name"], m["alias"], m["version"]


def log_and_register(
    client,
    run_id: str,
    adapter_dir: Path,
    name: str,
    alias: str,
    base_ref: str,
    lora_rank: int,
    metrics: dict[str, float] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log ``adapter_dir`` (PEFT files only) to the run and register a new version
    (tagged with ``extra_tags`` too: a preference run's method and lineage)."""
    import mlflow

    weights = [p for p in adapter_dir.iterdir() if p.name.startswith("adapter_model")]
    if not weights or not (adapter_dir / "adapter_config.json").exists():
        raise LoraplexError(f"{adapter_dir} is not a PEFT adapter folder")
    for p in adapter_dir.iterdir():  # the PEFT folder only, never base weights
        if p.is_file() and (p.name.startswith("adapter_") or p.name == "README.md"):
            client.log_artifact(run_id, str(p), ARTIFACT)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{ARTIFACT}"
    version_tags = {
        tags.BASE_MODEL: base_ref,
        tags.LORA_RANK: str(lora_rank),
        tags.RUN_ID: run_id,
        **{f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()},
        **(extra_tags or {}),
    }
    mv = client.create_model_version(name, source, run_id=run_id, tags=version_tags)
    try:
        set_alias(client, name, alias, str(mv.version), f"registered by run {run_id}")
    except Exception as e:
        # a version without its alias is an orphan nothing would ever serve: undo it
        try:
            client.delete_model_version(name, mv.version)
            undone = f"version {mv.version} was removed again"
        except Exception:
            undone = f"version {mv.version} is left without the alias"
        raise LoraplexError(
            f"registered {name} version {mv.version} but could not set alias {alias!r} "
            f"({first_line(e, 200)}); {undone}"
        ) from None
    return str(mv.version)


@dataclass
class AdapterVersion:
    name: str
    version: str
    aliases: list[str]
    base_model: str
    rank: str
    metrics: dict[str, str]
    run_id: str
    source: str


def list_adapters(client, name: str | None = None) -> list[AdapterVersion]:
    """Every version of every registered adapter (or of ``name``), all pages."""
    out = []
    models = [client.get_registered_model(name)] if name else all_registered_models(client)
    for rm in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in all_versions(client, rm.name):
            version_tags = mv.tags or {}
            if tags.BASE_MODEL not in version_tags:
                continue
            out.append(
                AdapterVersion(
                    rm.name,
                    str(mv.version),
                    sorted(by_version.get(str(mv.version), [])),
                    version_tags[tags.BASE_MODEL],
                    version_tags.get(tags.LORA_RANK, "?"),
                    {
                        k.removeprefix("metric."): v
                        for k, v in version_tags.items()
                        if k.startswith("metric.")
                    },
                    mv.run_id or "",
                    mv.source,
                )
            )
    return sorted(out, key=lambda a: (a.name, int(a.version)))


HISTORY_TAG = tags.ALIAS_HISTORY  # on the registered model: JSON list
HISTORY_KEEP = 20
LOG_TAG = tags.ALIAS_LOG  # on the registered model: JSON list of moves


def _history(client, name: str, alias: str) -> list[str]:
    model_tags = client.get_registered_model(name).tags or {}
    try:
        return [str(v) for v in json.loads(model_tags.get(HISTORY_TAG.format(alias=alias), "[]"))]
    except (json.JSONDecodeError, TypeError):
        return []


def set_alias(client, name: str, alias: str, version: str, why: str = "") -> str | None:
    """Point ``alias`` at ``version``, remembering the version it pointed at before (the
    history ``rollback`` goes back through) and who moved it, when and why (the log);
    returns that previous version."""
    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        before = None
    client.set_registered_model_alias(name, alias, version)
    if before is not None and before != version:
        history = [*_history(client, name, alias), before][-HISTORY_KEEP:]
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    try:  # the move is done; its log line is not worth undoing it for
        _log_move(client, name, alias, before, version, why or "set")
    except Exception as e:
        logging.getLogger(__name__).warning("alias log of %s@%s not written: %s", name, alias, e)
    return before


def _log_move(client, name: str, alias: str, before: str | None, now: str, why: str) -> None:
    import getpass

    model_tags = client.get_registered_model(name).tags or {}
    try:
        log = json.loads(model_tags.get(LOG_TAG.format(alias=alias), "[]"))
    except (json.JSONDecodeError, TypeError):
        log = []
    # the user MLflow authenticates (its basic auth), else this machine's user
    who = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if not who:
        try:
            who = getpass.getuser()
        except Exception:  # no user name in this environment (a container)
            who = "unknown"
    entry = {
        "from": before,
        "to": now,
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "by": who,
        "why": why[:300],
    }
    log = [*log, entry][-HISTORY_KEEP:]
    client.set_registered_model_tag(name, LOG_TAG.format(alias=alias), json.dumps(log))


def alias_log(client, name: str, alias: str) -> list[dict[str, Any]]:
    """Who moved ``alias``, when and why (the last 20 moves)."""
    model_tags = client.get_registered_model(name).tags or {}
    try:
        return list(json.loads(model_tags.get(LOG_TAG.format(alias=alias), "[]")))
    except (json.JSONDecodeError, TypeError):
        return []


def _versions(client, name: str) -> dict[str, AdapterVersion]:
    try:
        return {a.version: a for a in list_adapters(client, name)}
    except Exception:
        return {}


def promote(
    client,
    name: str,
    version: str,
    alias: str,
    check: Callable[[AdapterVersion], None] | None = None,
    why: str = "promote",
) -> str | None:
    """Point ``alias`` at ``version`` after ``check`` (e.g. that the version's files load
    against its base model) passed; returns the version it pointed at before. A failed
    check raises and leaves the alias where it was."""
    if not _ALIAS.match(alias):
        raise InputError(
            f"alias {alias!r}: use letters, digits, '_' and '-', starting with a letter"
        )
    versions = _versions(client, name)
    if not versions:
        raise InputError(f"no adapter named {name!r} (see `loraplex adapters list`)")
    if str(version) not in versions:
        known = ", ".join(sorted(versions, key=int))
        raise InputError(f"adapter {name!r} has no version {version} (versions: {known})")
    if check is not None:
        check(versions[str(version)])
    return set_alias(client, name, alias, str(version), why)


def rollback(client, name: str, alias: str) -> tuple[str, str]:
    """Move ``alias`` back to the version it pointed at before its last move; returns
    (from, to). The history shrinks by one, so a second rollback goes further back."""
    history = _history(client, name, alias)
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        raise InputError(f"{name}@{alias} does not exist: nothing to roll back") from None
    if not history:
        raise InputError(f"{name}@{alias} has no earlier version to roll back to")
    target = history[-1]
    if target not in _versions(client, name):
        raise InputError(f"{name} version {target} (before {current}) no longer exists")
    client.set_registered_model_alias(name, alias, target)
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history[:-1]))
    _log_move(client, name, alias, current, target, "rollback")
    return current, target


def check_loads(settings) -> Callable[[AdapterVersion], None]:
    """A ``promote`` check: the version's files download and fit its base model."""

    def check(v: AdapterVersion) -> None:
        import tempfile

        import mlflow

        base_dir, _ = resolve_base_model(v.base_model, settings)
        # an adapter is a few MB: no progress bar, so a refusal stays one line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tempfile.TemporaryDirectory(prefix="loraplex-promote-") as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{v.name}/{v.version}", dst_path=tmp
                )
            except Exception as e:
                raise InputError(
                    f"{v.name} version {v.version} cannot be downloaded ({first_line(e, 200)}); "
                    "alias not moved"
                ) from None
            try:
                validate_adapter(Path(path), base_dir)
            except InputError as e:
                reason = str(e).replace(str(path), f"{v.name}/{v.version}")
                raise InputError(f"{reason}; alias not moved") from None

    return check


def fetch_start(settings, ref: str, base_ref: str, base_dir: Path, into: Path) -> tuple[Path, str]:
    """The version ``ref`` names (NAME/VERSION or NAME@ALIAS), downloaded into ``into``
    and checked against the base model a run trains on: (its folder, ``NAME/VERSION``)."""
    import mlflow

    name, alias, version = parse_registry_ref(ref)
    client = mlflow.MlflowClient(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, str(version))
        )
    except Exception as e:
        raise InputError(f"adapter {ref} is not in the registry ({first_line(e, 200)})") from None
    trained_on = (mv.tags or {}).get(tags.BASE_MODEL)
    if trained_on != base_ref:
        raise InputError(
            f"adapter {name}/{mv.version} was trained on {trained_on}, this run's base model "
            f"is {base_ref}"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(into)
        )
    except Exception as e:
        raise InputError(
            f"adapter {name}/{mv.version} cannot be downloaded ({first_line(e, 200)})"
        ) from None
    validate_adapter(Path(path), base_dir)
    return Path(path), f"{name}/{mv.version}"


# -- adapters trained elsewhere ----------------------------------------------------


def validate_adapter(
    path: Path, base_dir: Path, max_rank: int = MAX_SERVING_RANK
) -> dict[str, Any]:
    """The adapter's config when it fits the base; InputError with the reason otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise InputError(f"{path}: adapter_config.json is missing (not a PEFT adapter folder)")
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise InputError(
            f"{path}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters are served"
        )
    rank = int(cfg.get("r") or 0)
    if rank < 1 or rank > max_rank:
        raise InputError(f"{path}: LoRA rank {rank} is outside 1..{max_rank} (the serving maximum)")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError(f"{path}: adapter_model.safetensors is missing")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise InputError(
            f"{weights}: cannot be read as safetensors ({first_line(e, 200)})"
        ) from None
    if not shapes:
        raise InputError(f"{weights}: holds no tensors")
    modules = dict(meta_model(base_dir).named_modules())
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    leaf_names = {n.rsplit(".", 1)[-1] for n in modules}
    missing = [t for t in targets if t not in leaf_names and t not in modules]
    if missing:
        raise InputError(f"{path}: target modules {missing} do not exist in the base model")
    for key, shape in shapes.items():
        m = re.match(
            r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.weight|\.default\.weight)?$", key
        )
        if not m:
            continue
        module = modules.get(m.group(1))
        if module is None or not hasattr(module, "in_features"):
            raise InputError(
                f"{path}: tensor {key} targets {m.group(1)}, which the base model lacks"
            )
        want = (rank, module.in_features) if m.group(2) == "A" else (module.out_features, rank)
        if tuple(shape) != want:
            raise InputError(
                f"{path}: tensor {key} has shape {list(shape)}, the base model needs {list(want)} "
                "(trained for a different base?)"
            )
    return cfg


def register_external(
    client,
    path: Path,
    name: str,
    base_dir: Path,
    base_ref: str,
    alias: str | None,
    experiment_id: str,
) -> str:
    """Validate and register an adapter folder trained elsewhere; returns the version."""
    cfg = validate_adapter(path, base_dir)
    run = client.create_run(
        experiment_id,
        run_name=f"register-{name}",
        tags={tags.KIND: tags.KIND_ADAPTER_REGISTRATION, tags.BASE_MODEL: base_ref},
    )
    client.log_param(run.info.run_id, "source_path", str(Path(path).absolute()))
    client.log_param(run.info.run_id, "lora.r", cfg.get("r"))
    try:
        version = log_and_register(
            client, run.info.run_id, Path(path), name, alias or "candidate", base_ref, int(cfg["r"])
        )
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return version
