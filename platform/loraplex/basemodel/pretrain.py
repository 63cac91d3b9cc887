"""Pretraining the tiny base model with Ray Train (``TorchTrainer`` on CPU workers).

Owns: :class:`PretrainConfig` (shape, curriculum, optimiser, workers), packing the
world's pretraining records into token rows (whole examples only, loss on prose and
on assistant answers), the training loop each Ray worker runs (DDP across workers,
rank 0 logging the loss curve to MLflow and printing progress), and writing the
result as a Hugging Face folder that transformers and vLLM both load.
Does not own: caching or the MLflow run's lifetime (``bootstrap``).

The curriculum has phases, each a weighted mix of record stages (see
``loraplex.world.pretraining``) packed into rows of one length: copying first (a small
model forms its copy heads there), then look-ups and multi-question reading of short
snippets in short rows, then whole documents in long rows. Short rows mean many cheap
steps, and it is steps, not tokens, that these circuits need; many questions per
source mean many look-ups to learn from per token.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from loraplex.basemodel.architecture import TinyLlamaSpec
from loraplex.config import StrictModel
from loraplex.errors import LoraplexError

IGNORE = -100


Stage = Literal["copy", "lookup", "snippet", "document", "prose"]


class Phase(StrictModel):
    name: str
    mix: dict[Stage, float] = Field(
        min_length=1, description="Record stages and their weights (shares of the records)."
    )
    seq_len: int = Field(
        default=512, ge=32, description="Row length; longer examples are left out."
    )
    batch_size: int = Field(default=4, ge=1)
    steps: int = Field(default=1000, ge=1)

    @field_validator("mix")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w <= 0 for w in v.values()):
            raise ValueError("every weight must be positive")
        return v


class PretrainConfig(StrictModel):
    model: TinyLlamaSpec = Field(default_factory=TinyLlamaSpec)
    vocab_size: int = Field(default=1536, ge=300)
    phases: list[Phase] = Field(
        default_factory=lambda: [
            Phase(name="copy", mix={"copy": 1}, seq_len=128, batch_size=8, steps=1300),
            Phase(
                name="look-ups",
                mix={"copy": 1, "lookup": 1, "snippet": 3},
                seq_len=128,
                batch_size=8,
                steps=3200,
            ),
            Phase(
                name="documents",
                mix={"copy": 1, "snippet": 2, "document": 3, "prose": 1},
                seq_len=512,
                batch_size=4,
                steps=1100,
            ),
        ],
        min_length=1,
    )
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    seed: int = 0
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: int = Field(default=2, ge=1)
    report_every: int = Field(default=100, ge=1)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


def encode_record(tokenizer, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids and labels: prose is learned whole, a conversation only in its answers."""
    if "text" in record:
        ids = tokenizer(record["text"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    enc = tokenizer.apply_chat_template(
        record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(enc["input_ids"])
    return ids, [t if m else IGNORE for t, m in zip(ids, enc["assistant_masks"], strict=True)]


def pack(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of whole examples into rows of ``seq_len`` (an example never
    straddles two rows, so an answer always sees its sources); longer ones are skipped."""
    rows_x: list[list[int]] = []
    rows_y: list[list[int]] = []
    cur_x: list[int] = []
    cur_y: list[int] = []
    for x, y in examples:
        if len(x) > seq_len:
            continue
        if len(cur_x) + len(x) > seq_len:
            rows_x.append(cur_x + [pad_id] * (seq_len - len(cur_x)))
            rows_y.append(cur_y + [IGNORE] * (seq_len - len(cur_y)))
            cur_x, cur_y = [], []
        cur_x += x
        cur_y += y
    if cur_x:
        rows_x.append(cur_x + [pad_id] * (seq_len - len(cur_x)))
        rows_y.append(cur_y + [IGNORE] * (seq_len - len(cur_y)))
    return torch.tensor(rows_x, dtype=torch.long), torch.tensor(rows_y, dtype=torch.long)


def prepare_phase_data(
    cfg: PretrainConfig, tokenizer, records: list[dict[str, Any]], out: Path
) -> list[dict[str, Any]]:
    """Tokenize once on the driver and save each phase's rows for the workers.

    A phase draws records by its mix weights until it has the tokens its steps need
    (``steps x batch_size x workers`` rows); each stage's records are used in order and
    reused from the start only when a stage runs out."""
    by_stage: dict[str, list[tuple[list[int], list[int]]]] = {}
    for r in records:
        by_stage.setdefault(r.get("stage", "prose"), []).append(encode_record(tokenizer, r))
    cursor = dict.fromkeys(by_stage, 0)
    rng = random.Random(cfg.seed)
    phases = []
    for phase in cfg.phases:
        missing = [s for s in phase.mix if not by_stage.get(s)]
        if missing:
            raise LoraplexError(f"phase {phase.name!r}: no pretraining records of stage {missing}")
        stages, weights = list(phase.mix), list(phase.mix.values())
        rows_needed = phase.steps * phase.batch_size * cfg.num_workers
        budget = rows_needed * phase.seq_len
        chosen: list[tuple[list[int], list[int]]] = []
        tokens = tried = 0
        while tokens < budget and tried < 50 * rows_needed:
            tried += 1
            stage = rng.choices(stages, weights)[0]
            pool = by_stage[stage]
            example = pool[cursor[stage] % len(pool)]
            cursor[stage] += 1
            if len(example[0]) <= phase.seq_len:
                chosen.append(example)
                tokens += len(example[0])
        x, y = pack(chosen, phase.seq_len, tokenizer.pad_token_id)
        if len(x) == 0:
            raise LoraplexError(
                f"phase {phase.name!r}: no example of {stages} fits in {phase.seq_len} tokens"
            )
        path = out / f"phase-{phase.name}.pt"
        torch.save({"input_ids": x, "labels": y}, path)
        phases.append({**phase.model_dump(), "path": str(path), "rows": len(x)})
    return phases


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))
    progress = min(1.0, step / max(1, cfg["total_steps"]))
    cosine = cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )
    return cfg["lr"] * warm * cosine


def train_loop_per_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs on each Ray Train worker; rank 0 logs and writes the model."""
    import ray.train
    import ray.train.torch
    from mlflow.tracking import MlflowClient
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(cfg["cpus_per_worker"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg["hf_config"]))
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"]
    )
    mlflow = MlflowClient(cfg["tracking_uri"]) if rank == 0 and cfg.get("run_id") else None
    history: list[dict[str, float]] = []
    step, tokens, start = 0, 0, time.perf_counter()
    window_tokens, window_start = 0, start
    generator = torch.Generator().manual_seed(cfg["seed"])
    for phase in cfg["phases"]:
        data = torch.load(phase["path"])
        x_all, y_all = data["input_ids"][rank::world], data["labels"][rank::world]
        batch = phase["batch_size"]
        order = torch.randperm(len(x_all), generator=generator)
        cursor = 0
        for _ in range(phase["steps"]):
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(x_all), generator=generator), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = model(input_ids=x_all[idx], labels=y_all[idx]).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_tok = int(batch * phase["seq_len"] * world)
            tokens += n_tok
            window_tokens += n_tok
            if step % cfg["report_every"] == 0 or step == cfg["total_steps"]:
                now = time.perf_counter()
                metrics = {
                    "loss": float(loss.item()),
                    "lr": lr_at(step - 1, cfg),
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / (now - window_start),
                    "tokens": float(tokens),
                }
                window_tokens, window_start = 0, now
                if rank == 0:
                    history.append({"step": step, **metrics})
                    print(
                        f"[pretrain] step {step}/{cfg['total_steps']} phase {phase['name']} "
                        f"loss {metrics['loss']:.3f} lr {metrics['lr']:.2e} "
                        f"{metrics['tokens_per_s']:.0f} tok/s",
                        flush=True,
                    )
                    if mlflow:
                        for key, value in metrics.items():
                            mlflow.log_metric(cfg["run_id"], key, value, step=step)
    elapsed = time.perf_counter() - start
    checkpoint = None
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {
                "step": step,
                "loss": history[-1]["loss"] if history else float("nan"),
                "train_seconds": elapsed,
            },
            checkpoint=checkpoint,
        )
    return {"steps": step, "tokens": tokens, "train_seconds": elapsed, "history": history}
