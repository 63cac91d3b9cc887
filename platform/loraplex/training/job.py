"""One fine-tuning job, from a validated config to a registered adapter version.

Owns: :func:`run_training` in three steps: plan (checking the base model, resolved by
``loraplex.models``; loading and tokenizing the data; the job's one MLflow run with its
params, tags and dataset fingerprint), run (the Ray Train ``TorchTrainer``:
``FailureConfig`` for worker failures, checkpoints in the job's storage, local or
s3://) and register (the adapter, the PEFT folder only, as a new version; the run ended
with its final status). A failure after training keeps the finished adapter in the
job's storage, so ``--resume`` registers it without training again. Does not own: the
worker loop (``worker``), the registry conventions (``models.adapters``), where the job's
state lives and its lock (``jobstore``), or what ``job.json`` says (``state``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex import tracking
from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.models import tags
from loraplex.models.adapters import fetch_start, log_and_register
from loraplex.models.resolve import check_base_model, resolve_base_model
from loraplex.ray_runtime import init_ray
from loraplex.training import state
from loraplex.training.config import REPO_ROOT, TrainConfig
from loraplex.training.dataset import load_examples, tokenize
from loraplex.training.jobstore import JobStore
from loraplex.training.pairs import as_trl_rows, check_lengths, load_pairs
from loraplex.world.manifest import seeds_tag

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
    adapter_location: str  # the finished adapter in the job's storage (a path or s3://)
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


@dataclass
class Plan:
    """A run of a job, decided and recorded before Ray starts."""

    cfg: TrainConfig
    settings: LoraplexConfig
    store: JobStore
    entry: dict[str, Any]
    resumed: bool
    base_dir: Path
    base_ref: str
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    run_id: str
    start: tuple[Path, str] | None = None  # dpo/orpo: the starting adapter, NAME/VERSION

    @property
    def run_name(self) -> str:
        return str(self.entry["run_name"])

    @property
    def kept(self) -> str:
        """Where the finished adapter is kept in the job's storage."""
        return f"{self.cfg.name}/{self.run_name}/final-adapter"


def run_training(cfg: TrainConfig, settings: LoraplexConfig, resume: bool = False) -> TrainResult:
    """Train, log, register. ``cfg`` paths must already be resolved. One run of a job
    at a time (the job's lock in its storage)."""
    store = JobStore(
        cfg.ray.storage_path or settings.ray.storage_path or settings.home / "ray_results"
    )
    store.check_writable()
    with store.lock(cfg.name):
        return _run(_plan(cfg, settings, store, resume))


def _plan(cfg: TrainConfig, settings: LoraplexConfig, store: JobStore, resume: bool) -> Plan:
    """The run to do: base model checked, data tokenized, the MLflow run created (or
    the unfinished one found again), ``job.json`` saying RUNNING."""
    import mlflow
    from transformers import AutoTokenizer

    entry, resumed = state.plan_run(store, cfg.name, resume)

    base_dir, base_ref = resolve_base_model(cfg.base_model, settings)
    check_base_model(base_dir, cfg.lora.target_modules)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if cfg.method == "sft":
        train_rows, eval_rows, data_print, truncated = _supervised_rows(cfg, tokenizer)
    else:
        pairs = load_pairs(cfg.data, cfg.train.seed)
        check_lengths(tokenizer, [*pairs.train, *pairs.eval], cfg.data.max_length)
        train_rows, eval_rows = as_trl_rows(pairs.train), as_trl_rows(pairs.eval)
        data_print, truncated = pairs.fingerprint, 0
    start = None
    if cfg.preference.start_from and cfg.method != "sft":
        into = settings.home / "cache" / "start-adapters" / entry["run_name"]
        start = fetch_start(settings, cfg.preference.start_from, base_ref, base_dir, into)
    log.info(
        "data: %d training rows, %d eval rows (%s), base model %s%s",
        len(train_rows),
        len(eval_rows),
        data_print["sha256"][:12],
        base_ref,
        f", {cfg.method} from adapter {start[1]}" if start else "",
    )

    fingerprint = state.run_fingerprint(cfg, data_print["sha256"])
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
                tags.KIND: tags.KIND_FINETUNE,
                tags.JOB: cfg.name,
                tags.BASE_MODEL: base_ref,
                tags.GIT_COMMIT: git_commit(),
                tags.DATASET_SHA256: data_print["sha256"],
                tags.STORAGE: store.location(f"{cfg.name}/{entry['run_name']}"),
                tags.WORLD_SEEDS: seeds_tag(cfg.data.train),
                tags.METHOD: cfg.method,
                **({tags.PARENT_VERSION: start[1]} if start else {}),
            },
        )
        run_id = run.info.run_id
        for key, value in tracking.flatten_params(cfg.model_dump(mode="json")).items():
            client.log_param(run_id, key, value)
        client.log_param(run_id, "dataset.train_rows", len(train_rows))
        client.log_param(run_id, "dataset.eval_rows", len(eval_rows))
        client.log_param(run_id, "dataset.truncated", truncated)
        client.log_dict(run_id, data_print, "dataset_fingerprint.json")
        entry["mlflow_run_id"] = run_id
        entry.update(fingerprint)
    state.start(store, cfg.name, entry)
    return Plan(
        cfg,
        settings,
        store,
        entry,
        resumed,
        base_dir,
        base_ref,
        train_rows,
        eval_rows,
        run_id,
        start,
    )


def _supervised_rows(cfg: TrainConfig, tokenizer) -> tuple[list, list, dict[str, Any], int]:
    """SFT: the conversations tokenized (train rows, eval rows, the data's fingerprint,
    how many were cut at ``data.max_length``)."""
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
    return train_rows, eval_rows, examples.fingerprint, truncated + eval_truncated


def _trainer(plan: Plan) -> Any:
    """Ray Train's ``TorchTrainer`` for the plan: checkpoints in the job's storage."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # here, not at the top: torch takes seconds to import; only running a job needs it
    from loraplex.training.worker import Runtime, loop_config, train_loop_per_worker

    cfg, settings = plan.cfg, plan.settings
    init_ray(settings)
    runtime = Runtime(
        base_dir=str(plan.base_dir),
        base_ref=plan.base_ref,
        home=str(settings.home),
        storage=plan.store.uri,
        storage_endpoint=plan.store.endpoint,
        job=f"{cfg.name}/{plan.run_name}",
        run_id=plan.run_id,
        tracking_uri=mlflow.get_tracking_uri(),
        registry_uri=settings.mlflow.registry_uri,
        train_rows=plan.train_rows,
        eval_rows=plan.eval_rows,
        start_dir=str(plan.start[0]) if plan.start else None,
        start_ref=f"models:/{plan.start[1]}" if plan.start else None,
    )
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.ray.use_gpu else "cpu")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, runtime),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            **plan.store.for_ray(cfg.name),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _run(plan: Plan) -> TrainResult:
    """Train (unless an earlier run of this plan finished training), then register."""
    import mlflow

    cfg, store, name = plan.cfg, plan.store, plan.cfg.name
    client = mlflow.MlflowClient()
    entry = plan.entry
    trained = (
        plan.resumed and entry.get("trained") and store.exists(f"{plan.kept}/adapter_config.json")
    )
    try:
        if trained:
            # the failure came after fit(): the finished adapter is kept; register it
            log.info("run %s finished training before; registering its adapter", plan.run_name)
            metrics = {k: float(v) for k, v in entry.get("metrics", {}).items()}
        else:
            metrics = _fit(_trainer(plan), plan)
            state.mark_trained(store, name, plan.run_name, metrics)
        with store.folder(plan.kept) as adapter:
            version = log_and_register(
                client,
                plan.run_id,
                adapter,
                cfg.mlflow.registered_model,
                cfg.mlflow.alias,
                base_ref=plan.base_ref,
                lora_rank=_rank(plan),
                metrics=metrics,
                extra_tags={
                    tags.METHOD: cfg.method,
                    **({tags.PARENT_VERSION: plan.start[1]} if plan.start else {}),
                },
            )
    except Exception as e:
        client.set_terminated(plan.run_id, status="FAILED")
        first = first_line(e)
        state.finish(store, name, plan.run_name, "FAILED")
        if isinstance(e, LoraplexError):
            raise
        after = (
            "register its finished adapter"
            if state.is_trained(store, name, entry)
            else ("continue from its last checkpoint")
        )
        raise LoraplexError(
            f"training run {plan.run_name} failed: {first} (rerun with --resume to {after})"
        ) from e
    for key, value in metrics.items():
        client.log_metric(plan.run_id, f"final_{key}", value)
    client.set_terminated(plan.run_id, status="FINISHED")
    state.finish(store, name, plan.run_name, "FINISHED", version=version)
    return TrainResult(
        name,
        plan.run_name,
        plan.run_id,
        cfg.mlflow.registered_model,
        version,
        cfg.mlflow.alias,
        metrics,
        store.location(plan.kept),
        plan.resumed,
    )


def _rank(plan: Plan) -> int:
    """The registered version's LoRA rank: the starting adapter's where there is one."""
    if plan.start is None:
        return plan.cfg.lora.r
    import json

    return int(json.loads((plan.start[0] / "adapter_config.json").read_text())["r"])


def _fit(trainer: Any, plan: Plan) -> dict[str, float]:
    """Train; the final adapter is copied whole into the job's storage before anything
    is registered, so a failure after this point resumes without training again."""
    # here, not at the top: torch takes seconds to import; only running a job needs it
    from loraplex.training.worker import ADAPTER_DIR

    result = trainer.fit()
    if result.checkpoint is None:
        raise LoraplexError(f"training run {plan.run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / ADAPTER_DIR / "adapter_config.json").exists():
            raise LoraplexError("the final checkpoint holds no adapter")
        plan.store.put_folder(Path(d) / ADAPTER_DIR, plan.kept)
    return {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
