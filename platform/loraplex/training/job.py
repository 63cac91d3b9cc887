"""One fine-tuning job, from a validated config to a registered adapter version.

Owns: :func:`run_training`: checking the base model (resolved by ``loraplex.models``),
loading and tokenizing the data, the job's one MLflow run (params, tags, dataset
fingerprint; ended with its final status), the Ray Train ``TorchTrainer``
(``FailureConfig`` for worker failures, checkpoints in Ray's storage path), logging the
adapter (the PEFT folder only) and registering it. A failure after training keeps the
finished adapter, so ``--resume`` registers it without training again. Does not own:
the worker loop (``worker``), the registry conventions (``registry``), or the job's
state between runs (``state``: ``job.json``, the lock, new run or ``--resume``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError
from loraplex.evaluation.provenance import SEEDS_TAG, seeds_tag
from loraplex.models.resolve import check_base_model, resolve_base_model
from loraplex.training import state
from loraplex.training.config import REPO_ROOT, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    name: str
    run_name: str
    mlflow_run_id: str
    registered_model: str
    version: str
    alias: str
    metrics: dict[str, float]
    adapter_dir: Path
    resumed: bool


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# -- the job -------------------------------------------------------------------


def run_training(cfg: TrainConfig, settings: LoraplexConfig, resume: bool = False) -> TrainResult:
    """Train, log, register. ``cfg`` paths must already be resolved. One run of a job
    at a time (``job_lock``)."""
    where = cfg.ray.storage_path or settings.ray.storage_path or settings.home / "ray_results"
    if "://" in str(where):
        # never Path("s3://bucket") (a local folder named "s3:"): say what works instead
        raise InputError(
            f"ray.storage_path {str(where)[:120]!r}: fine-tuning keeps its job state and "
            "checkpoints on a filesystem path; on a cluster, use a volume every node mounts "
            "(a ReadWriteMany PVC or NFS path)"
        )
    storage = Path(where).expanduser().absolute()
    with state.job_lock(storage, cfg.name):
        return _run_training(cfg, settings, resume, storage)


def _run_training(
    cfg: TrainConfig, settings: LoraplexConfig, resume: bool, storage: Path
) -> TrainResult:
    import mlflow
    from transformers import AutoTokenizer

    from loraplex import tracking
    from loraplex.ray_runtime import init_ray
    from loraplex.training.dataset import load_examples, tokenize
    from loraplex.training.registry import log_and_register

    entry, resumed = state.plan_run(storage, cfg.name, resume)

    base_dir, base_ref = resolve_base_model(cfg.base_model, settings)
    check_base_model(base_dir, cfg.lora.target_modules)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = load_examples(cfg.data, cfg.train.seed)
    train_rows, truncated = tokenize(tokenizer, examples.train, cfg.data.max_length)
    eval_rows, eval_truncated = tokenize(tokenizer, examples.eval, cfg.data.max_length)
    if not train_rows:
        raise InputError("no training example has an assistant turn left to learn from")
    if truncated or eval_truncated:
        log.warning(
            "%d training and %d eval examples were longer than data.max_length=%d and were cut",
            truncated,
            eval_truncated,
            cfg.data.max_length,
        )
    log.info(
        "data: %d training rows, %d eval rows (%s), base model %s",
        len(train_rows),
        len(eval_rows),
        examples.fingerprint["sha256"][:12],
        base_ref,
    )

    fingerprint = state.run_fingerprint(cfg, examples.fingerprint["sha256"])
    if resumed:
        state.check_resumable(entry, fingerprint)
    experiment_id = tracking.setup(settings, cfg.mlflow.experiment)
    client = mlflow.MlflowClient()
    if resumed:
        run_id = entry["mlflow_run_id"]
        log.info("resuming run %s (MLflow run %s)", entry["run_name"], run_id)
    else:
        run = client.create_run(
            experiment_id,
            run_name=entry["run_name"],
            tags={
                "loraplex.kind": "finetune",
                "loraplex.job": cfg.name,
                "loraplex.base_model": base_ref,
                "loraplex.git_commit": git_commit(),
                "loraplex.dataset_sha256": examples.fingerprint["sha256"],
                SEEDS_TAG: seeds_tag(cfg.data.train),
            },
        )
        run_id = run.info.run_id
        for key, value in tracking.flatten_params(cfg.model_dump(mode="json")).items():
            client.log_param(run_id, key, value)
        client.log_param(run_id, "dataset.train_rows", len(train_rows))
        client.log_param(run_id, "dataset.eval_rows", len(eval_rows))
        client.log_param(run_id, "dataset.truncated", truncated + eval_truncated)
        client.log_dict(run_id, examples.fingerprint, "dataset_fingerprint.json")
        entry["mlflow_run_id"] = run_id
        entry.update(fingerprint)
    job_state = state.read_state(storage, cfg.name)
    job_state["runs"] = [r for r in job_state["runs"] if r["run_name"] != entry["run_name"]] + [
        {**entry, "status": "RUNNING", "started": time.time()}
    ]
    state.write_state(storage, cfg.name, job_state)

    init_ray(settings)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from loraplex.training.worker import WorkerConfig, train_loop_per_worker

    job_dir = storage / cfg.name / entry["run_name"]
    loop_config = WorkerConfig(
        base_dir=str(base_dir),
        base_ref=base_ref,
        home=str(settings.home),
        job_dir=str(job_dir),
        lora=cfg.lora,
        train=cfg.train,
        deepspeed=cfg.deepspeed.as_dict(),
        use_gpu=cfg.ray.use_gpu,
        cpus_per_worker=cfg.ray.cpus_per_worker,
        train_rows=train_rows,
        eval_rows=eval_rows,
        run_id=run_id,
        tracking_uri=mlflow.get_tracking_uri(),
        registry_uri=settings.mlflow.registry_uri,
    ).model_dump(mode="json")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.ray.use_gpu else "cpu")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=entry["run_name"],
            storage_path=str(storage / cfg.name),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    kept = job_dir / "final-adapter"
    trained = resumed and entry.get("trained") and (kept / "adapter_config.json").exists()
    try:
        if trained:
            # the failure came after fit(): the finished adapter is kept; register it
            log.info("run %s finished training before; registering its adapter", entry["run_name"])
            adapter, metrics = kept, {k: float(v) for k, v in entry.get("metrics", {}).items()}
        else:
            adapter, metrics = _fit(trainer, entry["run_name"], kept)
            state.mark_trained(storage, cfg.name, entry["run_name"], metrics)
        version = log_and_register(
            client,
            run_id,
            adapter,
            cfg.mlflow.registered_model,
            cfg.mlflow.alias,
            base_ref=base_ref,
            lora_rank=cfg.lora.r,
            metrics=metrics,
        )
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        state.finish(storage, cfg.name, entry["run_name"], "FAILED")
        if isinstance(e, LoraplexError):
            raise
        after = (
            "register its finished adapter"
            if state.is_trained(storage, cfg.name, entry)
            else ("continue from its last checkpoint")
        )
        raise LoraplexError(
            f"training run {entry['run_name']} failed: {first} (rerun with --resume to {after})"
        ) from e
    for key, value in metrics.items():
        client.log_metric(run_id, f"final_{key}", value)
    client.set_terminated(run_id, status="FINISHED")
    state.finish(storage, cfg.name, entry["run_name"], "FINISHED", version=version)
    return TrainResult(
        cfg.name,
        entry["run_name"],
        run_id,
        cfg.mlflow.registered_model,
        version,
        cfg.mlflow.alias,
        metrics,
        kept,
        resumed,
    )


def _fit(trainer: Any, run_name: str, kept: Path) -> tuple[Path, dict[str, float]]:
    """Train; the final adapter lands in ``kept`` (replaced whole, never half-written)
    before anything is registered, so a failure after this point resumes without
    training again."""
    from loraplex.folders import replace_folder, staging_folder
    from loraplex.training.worker import ADAPTER_DIR

    result = trainer.fit()
    if result.checkpoint is None:
        raise LoraplexError(f"training run {run_name} produced no checkpoint")
    staging = staging_folder(kept)
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / ADAPTER_DIR / "adapter_config.json").exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise LoraplexError("the final checkpoint holds no adapter")
        shutil.copytree(Path(d) / ADAPTER_DIR, staging, dirs_exist_ok=True)
    replace_folder(staging, kept)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return kept, metrics
