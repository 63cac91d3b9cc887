"""MLflow set-up shared by every job: the tracking URI and the experiment.

Owns: probing the configured MLflow (:func:`probe`, which ``doctor`` reports and every
job asks before it starts), pointing MLflow at the configured tracking/registry URIs, creating an
experiment with the configured artifact location the first time, and flattening
nested configs into run parameters. Does not own: what a job logs.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError, first_line
from loraplex.probes import tcp_reachable, writable_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` found: ``ok``, what it saw, and the fix when not ok."""

    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


def probe(cfg: LoraplexConfig) -> Probe:
    """Whether the configured MLflow can be used, without waiting on its client's retries."""
    uri = cfg.mlflow.tracking_uri or ""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        ok, detail = writable_dir(db.parent)
        return Probe(
            ok,
            f"embedded sqlite: {db} - {detail}",
            None if ok else "set LORAPLEX_HOME (or mlflow.tracking_uri) to a writable place",
        )
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=cfg.mlflow.timeout_s) as r:
                ok = r.status == 200
                detail = f"{uri} answers /health ({r.status})"
        except (urllib.error.URLError, OSError) as e:
            ok, detail = False, f"{uri} does not answer: {getattr(e, 'reason', e)}"
        return Probe(
            ok,
            detail,
            None if ok else "start the MLflow server or fix mlflow.tracking_uri",
        )
    if parsed.scheme == "file":
        ok, detail = writable_dir(Path(parsed.path))
        return Probe(ok, f"file store: {detail}")
    if parsed.hostname and parsed.port:  # a database backend
        ok, detail = tcp_reachable(parsed.hostname, parsed.port, cfg.mlflow.timeout_s)
        return Probe(
            ok,
            f"database backend: {detail}",
            None if ok else "start the database or fix mlflow.tracking_uri",
        )
    return Probe(True, f"{parsed.scheme} backend (not probed)", required=False)


def setup(settings: LoraplexConfig, experiment: str | None = None) -> str:
    """Point MLflow at the settings; return the experiment id (created if missing)."""
    import mlflow

    uri = settings.mlflow.tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        # MLflow's own client retries an unreachable server for minutes; ask once.
        check = probe(settings)
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
        raise LoraplexError(f"MLflow at {uri} cannot be used: {first_line(e, 200)}") from None


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
