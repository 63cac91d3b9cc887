"""What base models exist: local folders under ``LORAPLEX_HOME/models`` joined with
the registered base-model versions.

Owns: :func:`list_models`. Does not own: importing (``importer``) or the registry
conventions (``registry``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex import tracking
from loraplex.config import LoraplexConfig
from loraplex.models import tags
from loraplex.models.registry import list_base_models
from loraplex.models.resolve import BOOTSTRAP_MARKER, EMBEDDED_FOLDER, models_dir, read_marker


@dataclass
class BaseModelRow:
    name: str
    parameters: int | None
    source: str
    folder: Path | None
    registry: str | None  # "v1 (current), v2"


def list_models(settings: LoraplexConfig) -> list[BaseModelRow]:
    import mlflow

    rows: dict[str, BaseModelRow] = {}
    root = models_dir(settings)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        marker = read_marker(folder) or _bootstrap_marker(folder)
        source = marker.get("source", "?")
        rows[folder.name] = BaseModelRow(
            folder.name, marker.get("parameters"), source, folder, None
        )
    tracking.setup(settings)
    versions: dict[str, list[str]] = {}
    for v in list_base_models(mlflow.MlflowClient()):
        aliases = f" ({', '.join(v.aliases)})" if v.aliases else ""
        versions.setdefault(v.name, []).append(f"v{v.version}{aliases}")
        params = v.tags.get(tags.PARAMETERS)
        count = int(params) if params and params.isdigit() else None
        if v.name not in rows:
            rows[v.name] = BaseModelRow(v.name, count, v.tags.get(tags.SOURCE, "?"), None, None)
        elif rows[v.name].parameters is None:
            rows[v.name].parameters = count
    for name, vs in versions.items():
        rows[name].registry = ", ".join(vs)
    return [rows[k] for k in sorted(rows)]


def _bootstrap_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / BOOTSTRAP_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    source = "loraplex bootstrap (embedded)" if folder.name == EMBEDDED_FOLDER else "bootstrap"
    return {"source": source, "parameters": marker.get("parameters")}
