"""A fine-tuning job's state between runs: ``<storage>/<job>/job.json`` and its lock.

Owns: reading and writing ``job.json`` atomically (every run of the job: its Ray run
name, MLflow run, status, the config and dataset fingerprints it started with, whether
its training finished), :func:`plan_run` (a new run ``<name>-<n>``, or ``--resume`` of
an unfinished one), :func:`check_resumable` (a resume refuses a changed config or
dataset), and :func:`job_lock` (one run of a job at a time; the second is refused with
the holder named). Does not own: training or registering (``job``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex.errors import InputError
from loraplex.training.config import TrainConfig


def state_path(storage: Path, name: str) -> Path:
    return storage / name / "job.json"


def read_state(storage: Path, name: str) -> dict[str, Any]:
    p = state_path(storage, name)
    return json.loads(p.read_text()) if p.exists() else {"name": name, "runs": []}


def write_state(storage: Path, name: str, state: dict[str, Any]) -> None:
    p = state_path(storage, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, p)


@contextlib.contextmanager
def job_lock(storage: Path, name: str) -> Iterator[None]:
    """Hold the job's lock for the whole run: a second ``loraplex train`` of the same
    job (same storage) is refused with the holder named, not run beside it."""
    path = storage / name / "job.lock"
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(
                f"job {name!r} is already running ({holder}); wait for it, or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            if created and [p.name for p in path.parent.iterdir()] == [path.name]:
                # refused before anything was written: leave no empty job behind
                path.unlink()
                path.parent.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


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


def plan_run(storage: Path, name: str, resume: bool) -> tuple[dict[str, Any], bool]:
    """The run to do now: (its state entry, resumed?)."""
    state = read_state(storage, name)
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


def mark_trained(storage: Path, name: str, run_name: str, metrics: dict[str, float]) -> None:
    state = read_state(storage, name)
    for r in state["runs"]:
        if r["run_name"] == run_name:
            r.update(trained=True, metrics=metrics)
    write_state(storage, name, state)


def is_trained(storage: Path, name: str, entry: dict[str, Any]) -> bool:
    state = read_state(storage, name)
    return any(r["run_name"] == entry["run_name"] and r.get("trained") for r in state["runs"])


def finish(storage: Path, name: str, run_name: str, status: str, **extra: Any) -> None:
    state = read_state(storage, name)
    for r in state["runs"]:
        if r["run_name"] == run_name:
            r.update(status=status, ended=time.time(), **extra)
    write_state(storage, name, state)
