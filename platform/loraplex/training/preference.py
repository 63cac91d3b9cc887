"""Preference tuning inside a Ray Train worker: TRL's DPO and ORPO trainers in place of
HF's ``Trainer``, on the same arguments, DeepSpeed config and callbacks.

Owns: the model a preference run trains (the starting adapter loaded trainable on the
base, or a fresh LoRA for ORPO without one; for DPO TRL adds a frozen copy of the
starting adapter as the reference, so the base model is held once), TRL's config built
from the job's ``TrainingArguments`` values, the trainer, and the names of the metrics
TRL logs that go to MLflow. Does not own: the pair rows (``training.pairs``), the worker
loop (``training.worker``) or registration (``training.job``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraplex.training.config import TrainConfig

# what TRL logs per step, as the job's MLflow run names them (slashes kept)
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
)


def start_model(base_dir: Path, start_dir: Path | None, cfg: TrainConfig) -> Any:
    """The base model (float32) with the starting adapter loaded trainable, or, with none
    (ORPO), the config's fresh LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.training.worker import peft_model

    if start_dir is None:
        return peft_model(base_dir, cfg.lora)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(start_dir), is_trainable=True)


def preference_trainer(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    args: dict[str, Any],
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    callbacks: list[Any],
) -> Any:
    """TRL's trainer for ``cfg.method`` on the rows (conversational pairs)."""
    from datasets import Dataset

    common = {
        **args,
        "beta": cfg.preference.beta,
        "max_length": cfg.data.max_length,
        "dataset_num_proc": None,
    }
    data = {
        "train_dataset": Dataset.from_list(train_rows),
        "eval_dataset": Dataset.from_list(eval_rows) if eval_rows else None,
        "processing_class": tokenizer,
        "callbacks": callbacks,
    }
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, args=DPOConfig(**common), **data)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=model, args=ORPOConfig(**common), **data)
