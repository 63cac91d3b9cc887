"""``loraplex bootstrap``: the embedded default world and base model, built once.

Owns: where they live under ``LORAPLEX_HOME`` (``worlds/seed-0``, ``models/tiny-llama``),
reusing them when they are complete (a second run says so), rebuilding with
``force``, and the MLflow run that records the pretraining (parameters, loss curve,
the model folder as an artifact), registered as a version of the base model
``tiny-llama`` (alias ``current``). The model folder is written to a staging folder
and renamed into place, so an interrupted bootstrap never leaves a half model.
Does not own: the world's content or the training loop (``pretrain``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loraplex import tracking
from loraplex.basemodel.pretrain import PretrainConfig, prepare_phase_data, train_loop_per_worker
from loraplex.basemodel.tokenizer import train_tokenizer
from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError
from loraplex.folders import replace_folder, staging_folder
from loraplex.models import tags
from loraplex.models.registry import register_run_artifact
from loraplex.models.resolve import BOOTSTRAP_MARKER, EMBEDDED_FOLDER
from loraplex.prompts import PROMPT_LAYOUT
from loraplex.ray_runtime import init_ray
from loraplex.world.generate import generate_world, is_current

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
MARKER = BOOTSTRAP_MARKER
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass
class BootstrapResult:
    world_dir: Path
    model_dir: Path
    run_id: str | None
    reused: bool
    seconds: float


def world_dir(settings: LoraplexConfig, seed: int = DEFAULT_SEED) -> Path:
    return settings.home / "worlds" / f"seed-{seed}"


def model_dir(settings: LoraplexConfig) -> Path:
    return settings.home / "models" / EMBEDDED_FOLDER


def existing_base(settings: LoraplexConfig) -> dict | None:
    """The marker of a complete base model folder, or None."""
    folder = model_dir(settings)
    marker = folder / MARKER
    if not marker.exists() or not all((folder / f).exists() for f in MODEL_FILES):
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bootstrap(
    settings: LoraplexConfig, force: bool = False, config: PretrainConfig | None = None
) -> BootstrapResult:
    start = time.perf_counter()
    cfg = config or PretrainConfig()
    wdir, mdir = world_dir(settings), model_dir(settings)
    marker = existing_base(settings)
    # a marker written before layouts were recorded is layout 1
    layout = marker.get("prompt_layout", 1) if marker else PROMPT_LAYOUT
    if layout != PROMPT_LAYOUT and not force:
        log.info(
            "the base model in %s was pretrained on an older prompt layout (%s, now %s): "
            "rebuilding it and the embedded world",
            mdir,
            layout,
            PROMPT_LAYOUT,
        )
        force = True
    if marker and not force and (wdir / "manifest.json").exists():
        if not is_current(wdir):
            log.info(
                "the embedded world in %s was written by an older loraplex: regenerating it "
                "(same documents, current task datasets); the base model is kept "
                "(`loraplex bootstrap --force` rebuilds it)",
                wdir,
            )
            generate_world(DEFAULT_SEED, wdir, force=True, pretraining=True)
        log.info(
            "reusing the base model in %s (built %s; --force rebuilds it)",
            mdir,
            marker.get("created"),
        )
        return BootstrapResult(
            wdir, mdir, marker.get("mlflow_run_id"), True, time.perf_counter() - start
        )

    corpus = wdir / "pretrain" / "corpus.jsonl"
    if force or not (wdir / "manifest.json").exists() or not corpus.exists():
        log.info(
            "generating the embedded world (seed %d) and its pretraining text in %s",
            DEFAULT_SEED,
            wdir,
        )
        generate_world(DEFAULT_SEED, wdir, force=True, pretraining=True)
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    log.info("training the tokenizer on %d pretraining records", len(records))
    tokenizer = train_tokenizer(_texts(records), vocab_size=cfg.vocab_size)

    import mlflow

    experiment_id = tracking.setup(settings)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name="bootstrap-base-model",
        tags={tags.KIND: tags.KIND_BASE_MODEL, tags.WORLD_SEED: "0"},
    )
    try:
        mlflow.log_params(tracking.flatten_params(cfg.model_dump()))
        with tempfile.TemporaryDirectory(prefix="loraplex-pretrain-") as tmp:
            phases = prepare_phase_data(cfg, tokenizer, records, Path(tmp))
            for p in phases:
                log.info(
                    "phase %s: %d rows of %d tokens, %d steps of %d rows",
                    p["name"],
                    p["rows"],
                    p["seq_len"],
                    p["steps"],
                    p["batch_size"],
                )
            hf_config = cfg.model.to_hf(
                len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
            )
            outcome = _fit(settings, cfg, phases, hf_config.to_dict(), run.info.run_id)
            staging = staging_folder(mdir)
            shutil.copytree(outcome["checkpoint"], staging, dirs_exist_ok=True)
            tokenizer.save_pretrained(staging)
            _write_generation_config(staging, tokenizer)
            marker = {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "world_seed": DEFAULT_SEED,
                "prompt_layout": PROMPT_LAYOUT,
                "mlflow_run_id": run.info.run_id,
                "steps": outcome["steps"],
                "train_seconds": outcome["train_seconds"],
                "config": cfg.model_dump(),
            }
            (staging / MARKER).write_text(json.dumps(marker, indent=2))
            replace_folder(staging, mdir)
        mlflow.log_dict({"history": outcome["history"]}, "train_history.json")
        parameters = _count_parameters(mdir)
        mlflow.log_metrics(
            {"train_seconds": outcome["train_seconds"], "parameters": float(parameters)}
        )
        mlflow.log_artifacts(str(mdir), artifact_path="base_model")
        mlflow.set_tag(tags.BASE_MODEL_PATH, str(mdir))
        # one base model among others: models:/tiny-llama@current reaches it from any node
        register_run_artifact(
            mlflow.MlflowClient(),
            run.info.run_id,
            EMBEDDED_FOLDER,
            {
                tags.SOURCE: "loraplex bootstrap",
                tags.PARAMETERS: str(parameters),
                tags.ARCHITECTURE: "LlamaForCausalLM",
                tags.LICENSE: "Apache-2.0",
                tags.WORLD_SEEDS: str(DEFAULT_SEED),
            },
        )
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    return BootstrapResult(wdir, mdir, run.info.run_id, False, time.perf_counter() - start)


def _texts(records: list[dict]) -> list[str]:
    return [
        r["text"] if "text" in r else "\n".join(m["content"] for m in r["messages"])
        for r in records
    ]


def _fit(
    settings: LoraplexConfig, cfg: PretrainConfig, phases: list[dict], hf_config: dict, run_id: str
) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(settings)
    loop_config = {
        **cfg.model_dump(exclude={"model", "phases"}),
        "phases": phases,
        "hf_config": hf_config,
        "total_steps": cfg.total_steps,
        "tracking_uri": settings.mlflow.tracking_uri,
        "run_id": run_id,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"bootstrap-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=settings.ray.storage_path,
        ),
    )
    log.info("pretraining on %d Ray Train worker(s), %d steps", cfg.num_workers, cfg.total_steps)
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise LoraplexError(f"pretraining failed: {result.error}")
    with result.checkpoint.as_directory() as folder:
        local = Path(tempfile.mkdtemp(prefix="loraplex-ckpt-"))
        shutil.copytree(folder, local, dirs_exist_ok=True)
    return {**(result.return_value or {}), "checkpoint": local}


def _write_generation_config(folder: Path, tokenizer) -> None:
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "do_sample": False,
                "max_new_tokens": 64,
            },
            indent=2,
        )
    )


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
