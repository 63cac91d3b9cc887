"""MLflow set-up shared by every job: the tracking URI and the experiment.

Owns: pointing MLflow at the configured tracking/registry URIs, creating an
experiment with the configured artifact location the first time, and flattening
nested configs into run parameters. Does not own: what a job logs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError

log = logging.getLogger(__name__)


def setup(settings: LoraplexConfig, experiment: str | None = None) -> str:
    """Point MLflow at the settings; return the experiment id (created if missing)."""
    import mlflow

    uri = settings.mlflow.tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        # MLflow's own client retries an unreachable server for minutes; ask once.
        from loraplex.doctor import check_mlflow

        check = check_mlflow(settings)
        if not check.ok:
            raise LoraplexError(f"MLflow: {check.detail}; {check.fix}")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if settings.mlflow.registry_uri:
        mlflow.set_registry_uri(settings.mlflow.registry_uri)
    name = experiment or settings.mlflow.experiment
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = settings.mlflow.artifact_location
        if location and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).absolute().as_uri()
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception as e:  # MlflowException, connection errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraplexError(f"MLflow at {uri} cannot be used: {first[:200]}") from None


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists are written as JSON-ish text."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
        else:
            out[name] = str(value)[:500]
    return out
