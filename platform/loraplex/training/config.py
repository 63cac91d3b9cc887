"""The fine-tuning job config: one YAML file, validated before Ray starts.

Owns: :class:`TrainConfig` and its parts (base model, data, LoRA, DeepSpeed, Ray,
hyperparameters, MLflow/registry), the shipped DeepSpeed config files, and turning the
DeepSpeed section into the dict HF ``TrainingArguments(deepspeed=...)`` takes.
Does not own: running the job (``loraplex.training.job``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from loraplex.config import StrictModel, load_model
from loraplex.errors import ConfigError, InputError
from loraplex.models.resolve import EMBEDDED

REPO_ROOT = Path(__file__).resolve().parents[3]
DEEPSPEED_DIR = REPO_ROOT / "jobs" / "configs" / "deepspeed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class DataConfig(StrictModel):
    train: list[Path] = Field(
        min_length=1, description="JSONL files ({home}/..., or relative to the config file)."
    )
    eval: list[Path] = Field(default_factory=list, description="Held-out JSONL files.")
    eval_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Split off from train when `eval` is empty."
    )
    format: Literal["auto", "alpaca", "sharegpt", "openai", "preference"] = Field(
        default="auto",
        description="preference: rows of prompt/chosen/rejected (DPO and ORPO read only it).",
    )
    max_examples: int | None = Field(
        default=None,
        ge=1,
        description="Train on a seeded sample of at most this many examples (all: null).",
    )
    max_eval_examples: int | None = Field(
        default=None, ge=1, description="Evaluate on a seeded sample of at most this many."
    )
    max_length: int = Field(default=512, ge=16, description="Longer examples are truncated.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v


class LoraConfigModel(StrictModel):
    r: int = Field(default=16, ge=1, le=256)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class DeepSpeedConfig(StrictModel):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(default=False, description="ZeRO-2/3: optimizer on CPU.")
    offload_params: bool = Field(default=False, description="ZeRO-3 only: parameters on CPU.")
    config: Path | None = Field(
        default=None, description="A DeepSpeed JSON to use as is (default: the shipped one)."
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage < 2:
            raise ValueError("offload_optimizer needs stage 2 or 3")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The DeepSpeed config HF fills in ("auto" values come from TrainingArguments)."""
        path = self.config or DEEPSPEED_DIR / f"zero{self.stage}.json"
        ds = json.loads(Path(path).read_text())
        zero = ds.setdefault("zero_optimization", {"stage": self.stage})
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        return ds


class RayTrainConfig(StrictModel):
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: bool = False
    storage_path: str | None = Field(default=None, description="Default: ray.storage_path.")
    max_failures: int = Field(default=2, ge=-1, description="Worker failures to recover from.")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        default="SPREAD",
        description=(
            "How workers are placed on nodes (Ray placement group strategy): SPREAD puts "
            "them on different nodes where it can (one node: all there), so one node's "
            "death takes one worker, not all."
        ),
    )


class Hyperparameters(StrictModel):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(default=2e-4, gt=0)
    per_device_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    logging_steps: int = Field(default=5, ge=1)
    eval_steps: int = Field(default=50, ge=1)
    save_steps: int = Field(default=50, ge=1, description="Checkpoint interval (steps).")
    seed: int = 0


class TrackingConfig(StrictModel):
    experiment: str | None = Field(default=None, description="Default: mlflow.experiment.")
    registered_model: str = Field(min_length=1, max_length=100)
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")

    @field_validator("registered_model")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-'")
        return v


class PreferenceConfig(StrictModel):
    """DPO and ORPO (``method``): TRL's trainers in the same Ray Train + DeepSpeed job."""

    beta: float = Field(
        default=0.1,
        gt=0,
        description="DPO: how far from the reference it may move; ORPO: the odds-ratio weight.",
    )
    start_from: str | None = Field(
        default=None,
        description="The adapter version to start from, NAME/VERSION or NAME@ALIAS (the "
        "supervised one). DPO needs it: a frozen copy of it is the reference model (no second "
        "base model). The new version's lineage tag names it.",
    )


class TrainConfig(StrictModel):
    name: str = Field(description="Job name: the Ray run and MLflow run are named after it.")
    base_model: str = Field(
        default=EMBEDDED,
        description="'embedded' (the bootstrap model), a name imported with `loraplex models "
        "import` (smollm2-135m-instruct), models:/NAME@ALIAS or models:/NAME/VERSION, a "
        "local HF folder, or a Hugging Face id where the hub is reachable.",
    )
    method: Literal["sft", "dpo", "orpo"] = Field(
        default="sft",
        description="sft: supervised on conversations; dpo/orpo: preference tuning on "
        "prompt/chosen/rejected pairs (data.format preference).",
    )
    data: DataConfig
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    train: Hyperparameters = Field(default_factory=Hyperparameters)
    mlflow: TrackingConfig

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 100)")
        return v

    @model_validator(mode="after")
    def _method_and_data(self) -> TrainConfig:
        fmt = self.data.format
        if self.method == "sft" and fmt == "preference":
            raise ValueError("data.format preference is for method dpo or orpo, not sft")
        if self.method != "sft" and fmt not in ("auto", "preference"):
            raise ValueError(f"method {self.method} reads data.format preference, not {fmt}")
        if self.method == "dpo" and not self.preference.start_from:
            raise ValueError(
                "method dpo needs preference.start_from: the adapter version it starts from "
                "and is measured against (e.g. json-answer/3)"
            )
        if self.preference.start_from:
            from loraplex.models.adapters import parse_registry_ref

            parse_registry_ref(self.preference.start_from)  # ValueError names the form
        return self

    def resolve_paths(self, relative_to: Path, home: Path) -> TrainConfig:
        """Data paths: ``{home}`` expanded to LORAPLEX_HOME, relative ones taken from the
        config file's folder; each checked to exist."""
        root = relative_to.absolute()

        def fix(p: Path) -> Path:
            p = Path(str(p).replace("{home}", str(home)))
            return p if p.is_absolute() else (root / p)

        data = self.data.model_copy(
            update={
                "train": [fix(p) for p in self.data.train],
                "eval": [fix(p) for p in self.data.eval],
            }
        )
        for p in [*data.train, *data.eval]:
            if not p.is_file():
                raise ValueError(f"data file {p} does not exist")
        ds = self.deepspeed
        if ds.config is not None:
            ds = ds.model_copy(update={"config": fix(ds.config)})
            if not ds.config.is_file():
                raise ValueError(f"deepspeed.config {ds.config} does not exist")
        return self.model_copy(update={"data": data, "deepspeed": ds})


def load_train_config(path: Path, overrides: tuple[str, ...], home: Path):
    """A training config from YAML + overrides, with data paths resolved."""
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    cfg = load_model(TrainConfig, path, overrides)
    try:
        return cfg.resolve_paths(path.parent, home)
    except ValueError as e:
        raise InputError(str(e)) from None
