"""A fine-tuning job's state between runs: ``<storage>/<job>/job.json``.

Owns: what ``job.json`` says (every run of the job: its Ray run name, MLflow run,
status, the config and dataset fingerprints it started with, whether its training
finished) and every write of it (:func:`start`, :func:`mark_trained`, :func:`finish`),
:func:`plan_run` (a new run ``<name>-<n>``, or ``--resume`` of an unfinished one) and
:func:`check_resumable` (a resume refuses a changed config or dataset). Does
not own: where the file lives, how it is written whole, or the job's lock
(``jobstore``: a local folder or s3://), nor training or registering (``job``).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from loraplex.errors import InputError
from loraplex.training.config import TrainConfig
from loraplex.training.jobstore import JobStore


def read_state(store: JobStore, name: str) -> dict[str, Any]:
    text = store.read_text(f"{name}/job.json")
    return json.loads(text) if text else {"name": name, "runs": []}


def write_state(store: JobStore, name: str, state: dict[str, Any]) -> None:
    store.write_text(f"{name}/job.json", json.dumps(state, indent=2))


def run_fingerprint(cfg: TrainConfig, dataset_sha256: str) -> dict[str, str]:
    """What a resumed run must share with the run it continues."""
    config = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return {
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "dataset_sha256": dataset_sha256,
    }


def check_resumable(entry: dict[str, Any], fingerprint: dict[str, str]) -> None:
    for key, what in (("config_sha256", "the config"), ("dataset_sha256", "the dataset")):
        if entry.get(key) not in (None, fingerprint[key]):
            raise InputError(
                f"cannot resume {entry['run_name']}: {what} changed since it started "
                f"({entry[key][:12]} then, {fingerprint[key][:12]} now); run without "
                "--resume for a new run"
            )


def plan_run(store: JobStore, name: str, resume: bool) -> tuple[dict[str, Any], bool]:
    """The run to do now: (its state entry, resumed?)."""
    state = read_state(store, name)
    runs = state["runs"]
    if resume:
        if not runs:
            raise InputError(f"job {name!r} has no earlier run to resume")
        last = runs[-1]
        if last["status"] == "FINISHED":
            raise InputError(
                f"job {name!r} finished (run {last['run_name']}, adapter version "
                f"{last.get('version', '?')}); nothing to resume: run it without --resume "
                "for a new run"
            )
        return last, True
    run_name = name if not runs else f"{name}-{len(runs) + 1}"
    return {"run_name": run_name, "status": "NEW"}, False


def start(store: JobStore, name: str, entry: dict[str, Any]) -> None:
    """Record ``entry`` as the job's running run (replacing its earlier record if resumed)."""
    state = read_state(store, name)
    state["runs"] = [r for r in state["runs"] if r["run_name"] != entry["run_name"]] + [
        {**entry, "status": "RUNNING", "started": time.time()}
    ]
    write_state(store, name, state)


def mark_trained(store: JobStore, name: str, run_name: str, metrics: dict[str, float]) -> None:
    state = read_state(store, name)
    for r in state["runs"]:
        if r["run_name"] == run_name:
            r.update(trained=True, metrics=metrics)
    write_state(store, name, state)


def is_trained(store: JobStore, name: str, entry: dict[str, Any]) -> bool:
    state = read_state(store, name)
    return any(r["run_name"] == entry["run_name"] and r.get("trained") for r in state["runs"])


def finish(store: JobStore, name: str, run_name: str, status: str, **extra: Any) -> None:
    state = read_state(store, name)
    for r in state["runs"]:
        if r["run_name"] == run_name:
            r.update(status=status, ended=time.time(), **extra)
    write_state(store, name, state)
