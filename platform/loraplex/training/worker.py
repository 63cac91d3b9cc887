"""What each Ray Train worker runs: HF ``Trainer`` + PEFT LoRA + DeepSpeed.

Owns: :class:`Runtime` (what crosses the Ray boundary beside the :class:`TrainConfig`
itself), :func:`peft_model` (the base model with the config's LoRA attached; DPO/ORPO
models and trainers come from ``training.preference``),
:func:`train_loop_per_worker` (model and adapter set-up, ``TrainingArguments``
with the DeepSpeed config, resuming from the checkpoint Ray hands back after a
failure, the final evaluation, and reporting the finished adapter as the last Ray
checkpoint), the MLflow callback that logs per-step metrics from rank 0 into the job's
one run, and the padding collator. Checkpoints go to Ray through
``RayTrainReportCallback`` every ``save_steps``. Does not own: the MLflow run's
lifetime, registration (``job``) or the data (``dataset``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from loraplex.config import LoraplexConfig
from loraplex.models.resolve import on_this_node
from loraplex.training.config import LoraConfigModel, TrainConfig
from loraplex.training.dataset import IGNORE
from loraplex.training.jobstore import JobStore
from loraplex.training.preference import PREFERENCE_METRICS, preference_trainer, start_model

ADAPTER_DIR = "adapter"


class Runtime(BaseModel):
    """What the driver decided for one run, beside its :class:`TrainConfig`: where the
    base model, the job's storage and MLflow are, and the tokenized rows. The config and
    this record are all that crosses the Ray boundary (``loop_config``)."""

    model_config = ConfigDict(extra="forbid")

    base_dir: str  # the driver's folder; used where this node sees it
    base_ref: str  # else downloaded by this reference (models:/...) into the node's cache
    home: str  # LORAPLEX_HOME of the driver: the node's cache where the node sets none
    storage: str  # the job's storage (a folder every node mounts, or s3://)
    storage_endpoint: str | None = None  # the driver's S3-compatible endpoint, if any
    job: str  # <job>/<run> in it
    run_id: str | None = None
    tracking_uri: str
    registry_uri: str | None = None
    # sft: token ids and labels; dpo/orpo: conversational prompt/chosen/rejected pairs
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    start_dir: str | None = None  # dpo/orpo: the starting adapter in the driver's folder
    start_ref: str | None = None  # else downloaded by this reference (models:/NAME/N)

    def base_folder(self) -> Path:
        """The base model on the node this worker runs on."""
        settings = LoraplexConfig.model_validate(
            {
                "home": os.environ.get("LORAPLEX_HOME") or self.home,
                "mlflow": {"tracking_uri": self.tracking_uri, "registry_uri": self.registry_uri},
            }
        )
        return on_this_node(self.base_dir, self.base_ref, settings)

    def start_folder(self, work: Path) -> Path | None:
        """The starting adapter on the node this worker runs on (downloaded into ``work``
        where the driver's folder is not seen)."""
        if self.start_dir is None:
            return None
        if (Path(self.start_dir) / "adapter_config.json").is_file():
            return Path(self.start_dir)
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        if self.registry_uri:
            mlflow.set_registry_uri(self.registry_uri)
        return Path(mlflow.artifacts.download_artifacts(self.start_ref, dst_path=str(work)))


def loop_config(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """What ``TorchTrainer`` hands every worker: the config as validated, and the run."""
    return {"config": cfg.model_dump(mode="json"), "runtime": runtime.model_dump(mode="json")}


def peft_model(base_dir: Path, lora: LoraConfigModel) -> Any:
    """The base model (float32: bfloat16 is slower on CPUs without native support) with
    the config's LoRA adapter attached: what every worker trains, and the baseline of the
    training-overhead benchmark."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias=lora.bias,
            task_type="CAUSAL_LM",
        ),
    )


class PadCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            attention[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def _callbacks(runtime: Runtime, rank: int):
    from transformers import TrainerCallback

    class ProgressAndMlflow(TrainerCallback):
        """Rank 0: a progress line per log, and the metrics into the job's MLflow run."""

        def __init__(self) -> None:
            self.client = None
            if runtime.run_id:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(runtime.tracking_uri)
            self.last: tuple[float, int] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step = state.global_step
            metrics = {}
            names = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}
            names |= {"eval_loss": "eval_loss", "num_input_tokens_seen": "tokens"}
            names |= {m: m for m in PREFERENCE_METRICS}
            names |= {f"eval_{m}": f"eval_{m}" for m in PREFERENCE_METRICS}
            for key, name in names.items():
                if isinstance(logs.get(key), int | float):
                    metrics[name] = float(logs[key])
            if "eval_loss" in metrics:
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
            now, seen = time.perf_counter(), int(logs.get("num_input_tokens_seen", 0))
            if seen and self.last and now > self.last[0] and seen > self.last[1]:
                metrics["tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
            if seen:
                self.last = (now, seen)
            if not metrics:
                return
            parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k != "tokens"]
            print(f"[train] step {step}/{state.max_steps} " + " ".join(parts), flush=True)
            if self.client:
                stamp = int(time.time() * 1000)
                from mlflow.entities import Metric

                self.client.log_batch(
                    runtime.run_id,
                    metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()],
                )

    from ray.train.huggingface.transformers import RayTrainReportCallback

    return [RayTrainReportCallback(), *([ProgressAndMlflow()] if rank == 0 else [])]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = TrainConfig.model_validate(config["config"])
    run = Runtime.model_validate(config["runtime"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    # Where the worker process is, for operators (and the fault-tolerance tests).
    store = JobStore(run.storage, run.storage_endpoint)
    store.write_text(f"{run.job}/workers/rank-{rank}.pid", str(os.getpid()))
    store.write_text(f"{run.job}/workers/rank-{rank}.node", ray.get_runtime_context().get_node_id())

    base_dir = run.base_folder()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    work = Path(tempfile.mkdtemp(prefix=f"loraplex-train-rank{rank}-"))
    if cfg.method == "sft":
        model = peft_model(base_dir, cfg.lora)
    else:
        model = start_model(base_dir, run.start_folder(work / "start"), cfg)
    hp = cfg.train
    use_gpu = cfg.ray.use_gpu
    has_eval = bool(run.eval_rows)
    args = dict(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=hp.per_device_batch_size,
        per_device_eval_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,  # a float in [0, 1) is a ratio of the total
        weight_decay=hp.weight_decay,
        logging_steps=hp.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=hp.eval_steps,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=2,
        seed=hp.seed,
        report_to=[],
        deepspeed=cfg.deepspeed.as_dict(),
        use_cpu=not use_gpu,
        ddp_backend=None if use_gpu else "gloo",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
        save_only_model=False,
    )
    callbacks = _callbacks(run, rank)
    if cfg.method == "sft":
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=run.train_rows,
            eval_dataset=run.eval_rows or None,
            data_collator=PadCollator(tokenizer.pad_token_id or 0),
            callbacks=callbacks,
        )
    else:
        trainer = preference_trainer(
            cfg, model, tokenizer, args, run.train_rows, run.eval_rows, callbacks
        )
    # our progress line replaces the raw log dicts HF prints when tqdm is off
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    start = time.perf_counter()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = Path(d) / "checkpoint"
            if rank == 0:
                print(
                    f"[train] resuming from the checkpoint of step {_step_of(resume)}", flush=True
                )
            trainer.train(resume_from_checkpoint=str(resume))
    else:
        trainer.train()
    train_seconds = time.perf_counter() - start
    final = trainer.evaluate() if has_eval else {}
    eval_loss = final.get("eval_loss")
    # Every rank takes part in saving (ZeRO-3 gathers the shards); rank 0 writes.
    adapter_root = work / "final"
    trainer.save_model(str(adapter_root / ADAPTER_DIR))
    metrics = {
        "step": trainer.state.global_step,
        "train_seconds": train_seconds,
        **(
            {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))}
            if eval_loss is not None
            else {}
        ),
        **final_preference_metrics(trainer.state.log_history, final),
    }
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(adapter_root)) if rank == 0 else None,
    )
    return metrics


def final_preference_metrics(history: list[dict], final: dict) -> dict[str, float]:
    """DPO/ORPO: the rewards of the final evaluation, else of the last training log,
    named for MLflow and version tags (``rewards_margins``, ``eval_rewards_margins``)."""
    out: dict[str, float] = {}
    last = next((h for h in reversed(history) if "rewards/chosen" in h), {})
    for source, prefix in ((last, ""), (final, "eval_")):
        for m in PREFERENCE_METRICS:
            value = source.get(f"{prefix}{m}")
            if isinstance(value, int | float):
                out[f"{prefix}{m.replace('/', '_')}"] = float(value)
    return out


def _step_of(checkpoint_dir: Path) -> str:
    import json

    state = checkpoint_dir / "trainer_state.json"
    return str(json.loads(state.read_text()).get("global_step", "?")) if state.exists() else "?"
