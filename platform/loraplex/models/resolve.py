"""Any base-model reference -> a local Hugging Face folder.

Owns: :func:`resolve_base_model` for every reference a training, serving or evaluation
config may hold:

- ``embedded``: the tiny model ``loraplex bootstrap`` builds (``models/tiny-llama``);
- a name imported with ``loraplex models import`` (``LORAPLEX_HOME/models/<name>``);
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (a registered base model), and
  ``runs:/`` / ``mlflow-artifacts:/`` URIs, downloaded once into
  ``LORAPLEX_HOME/cache/base-models`` (staged, then renamed: a partial download is
  never reused);
- a local folder, or a hub id where the hub is reachable.

On a cluster, :func:`on_this_node` gives a remote task (a training worker, a serving
replica) the folder on the node it runs on: the driver's folder where that node sees it,
else a download from the registry into that node's own cache.

Also the meta-device checks every consumer needs (:func:`meta_model`,
:func:`check_base_model`). Does not own: importing (``importer``) or the registry
conventions (``registry``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from loraplex import tracking
from loraplex.config import NAME as NAME_PATTERN
from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.folders import replace_folder, staging_folder
from loraplex.models.builtin import BUILTIN

EMBEDDED = "embedded"  # the tiny base model `loraplex bootstrap` builds
EMBEDDED_FOLDER = "tiny-llama"
MARKER = "loraplex_model.json"  # written by `models import` (provenance, registry version)
BOOTSTRAP_MARKER = "loraplex_base.json"  # written by `loraplex bootstrap` (the tiny model)
NAME = re.compile(NAME_PATTERN)
_MODELS_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[1-9][0-9]{0,8}))$"
)


def models_dir(settings: LoraplexConfig) -> Path:
    return settings.home / "models"


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_base_model(ref: str, settings: LoraplexConfig) -> tuple[Path, str]:
    """(local folder, canonical reference) for a base-model reference; InputError with
    what to do when it cannot be had."""

    if ref == EMBEDDED or ref.startswith(f"{EMBEDDED}:"):
        # "embedded:<folder>" is the canonical form tags record: this home's tiny model
        folder = models_dir(settings) / EMBEDDED_FOLDER
        if not (folder / "config.json").exists():
            raise InputError(f"no embedded base model in {folder}: run `loraplex bootstrap` first")
        return folder, f"embedded:{folder}"
    if ref.startswith(REGISTRY_PREFIXES):
        return _from_mlflow(ref, settings)
    local = Path(ref).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise InputError(f"base_model {ref}: not a Hugging Face model folder (no config.json)")
        return local.absolute(), str(local.absolute())
    if ref.startswith(("/", "./", "../", "~")):
        raise InputError(f"base_model folder {ref} does not exist")
    if NAME.match(ref) and "/" not in ref:
        folder = models_dir(settings) / ref
        if (folder / "config.json").exists():
            marker = read_marker(folder) or {}
            registered = marker.get("registered") or {}
            if registered.get("name") and registered.get("version"):
                return folder, f"models:/{registered['name']}/{registered['version']}"
            return folder, ref
        if ref in BUILTIN:
            raise InputError(
                f"base model {ref} is not imported yet: run `loraplex models import {ref}`"
            )
    return _from_hub(ref)


REGISTRY_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")


def on_this_node(folder: str, ref: str, settings: LoraplexConfig) -> Path:
    """The base model's folder on the node this code runs on: ``folder`` (the driver's)
    where this node sees it (one machine, a shared volume), else ``ref`` downloaded from
    the registry into this node's cache. InputError naming the node when neither works:
    a folder of the driver's disk cannot reach another node."""
    local = Path(folder)
    if (local / "config.json").exists():
        return local
    if ref.startswith(REGISTRY_PREFIXES):
        return _from_mlflow(ref, settings)[0]
    import socket

    raise InputError(
        f"base model {ref}: the folder {folder} is not on node {socket.gethostname()}; on a "
        "cluster name the base model by its registry URI (models:/NAME@ALIAS, see "
        "`loraplex models list`) so that every node downloads it"
    )


def _from_hub(ref: str) -> tuple[Path, str]:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref)), ref
    except Exception as e:
        first = first_line(e, 160)
        raise InputError(
            f"base_model {ref!r} is not an imported model (`loraplex models list`), a local "
            f"folder or an MLflow URI, and the hub cannot provide it ({first})"
        ) from None


def _from_mlflow(ref: str, settings: LoraplexConfig) -> tuple[Path, str]:
    """Download once per node into the cache, keyed by the registry version an alias
    points at now (a moved alias downloads the new version)."""
    import mlflow

    tracking.setup(settings)
    canonical = ref
    m = _MODELS_URI.match(ref)
    if ref.startswith("models:/") and not m:
        raise InputError(f"base_model {ref}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    if m:
        client = mlflow.MlflowClient()
        try:
            if m["alias"]:
                mv = client.get_model_version_by_alias(m["name"], m["alias"])
            else:
                mv = client.get_model_version(m["name"], m["version"])
        except mlflow.exceptions.MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
                raise InputError(f"base_model {ref}: not in the MLflow registry") from None
            raise LoraplexError(
                f"base_model {ref}: MLflow cannot be read ({first_line(e)})"
            ) from None
        canonical = f"models:/{m['name']}/{mv.version}"
        key = f"{m['name']}/{mv.version}"
    else:
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", ref)
    cache = settings.home / "cache" / "base-models" / key
    if (cache / "config.json").exists():
        return cache, canonical
    staging = staging_folder(cache)
    try:
        got = Path(mlflow.artifacts.download_artifacts(canonical, dst_path=str(staging)))
        found = (
            [got]
            if (got / "config.json").exists()
            else [p.parent for p in got.rglob("config.json")]
        )
        if not found:
            raise InputError(f"base_model {ref}: the artifact holds no config.json")
        if found[0] != staging:
            moved = staging_folder(cache)
            shutil.rmtree(moved)
            found[0].rename(moved)
            shutil.rmtree(staging, ignore_errors=True)
            staging = moved
        replace_folder(staging, cache)
    except InputError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(
            f"base_model {ref}: cannot download from MLflow ({first_line(e)})"
        ) from None
    return cache, canonical


def plain_config(folder: Path, gguf_file: str | None = None, label: str | None = None):
    """The model config of a folder (or of a GGUF file in it), without the
    ``quantization_config`` a GGUF load adds; InputError when it cannot be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            folder, **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except Exception as e:
        who = label or f"base model {folder}"
        raise InputError(f"{who}: unreadable model config ({first_line(e, 160)})") from None
    values = config.to_dict()
    values.pop("quantization_config", None)
    return type(config).from_dict(values)


def meta_model(base_dir: Path, gguf_file: str | None = None, label: str | None = None):
    """The base model built on the meta device (no weights read): its module tree.
    InputError when the folder (or GGUF file) is not a causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    config = plain_config(base_dir, gguf_file, label)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError:
        who = label or f"base model {base_dir}"
        raise InputError(f"{who} is a {config.model_type!r} model, not a causal LM") from None


def check_base_model(base_dir: Path, target_modules: list[str]) -> None:
    """A causal LM whose modules include every LoRA target."""
    import torch

    model = meta_model(base_dir)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        linear = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        raise InputError(
            f"lora.target_modules {missing} do not exist in the base model "
            f"(its linear layers: {', '.join(sorted(linear))})"
        )
