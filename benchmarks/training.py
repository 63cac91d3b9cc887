"""Benchmark of fine-tuning (issue: Fine-tuning).

Measures, in one run, on the embedded base model of --home (run `loraplex bootstrap` or
benchmarks/basemodel.py first):
1. overhead: training throughput of `loraplex train` (1 Ray Train worker with both
   cores, DeepSpeed ZeRO-2) against a plain single-process HF Trainer + PEFT script on
   the same model, data, batch and steps; then 2 workers with one core each; peak memory
   (RSS summed over this process and its Ray workers) of each;
2. quality: the JSON-answer adapter (jobs/configs/json_answer.yaml) against the base
   model, gold passage in the prompt, on held-out questions: JSON-schema compliance and
   exact match of the answer; the ticket adapter (jobs/configs/ticket_classify.yaml)
   against the base model on held-out tickets: accuracy.

On a real model: ``--config jobs/configs/smollm2/json_answer.yaml --skip-quality`` measures
the overhead on SmolLM2-135M-Instruct (import it into --home first); ``--one-worker`` leaves
out the 2-worker run.

Usage: .venv/bin/python benchmarks/training.py --home /tmp/bench-home [--steps 60]
Prints JSON (paste the figures into benchmarks/RESULTS.md) and writes training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


class PeakRss:
    """Peak RSS of this process and all its children, sampled twice a second."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.5)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def plain_hf(cfg, base_dir: Path, rows: list, eval_rows: list, steps: int) -> dict:
    """The same training, no Ray and no DeepSpeed: HF Trainer + PEFT in this process."""
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from loraplex.training.worker import PadCollator, peft_model

    seen: list[tuple[int, float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_input_tokens_seen" in logs:
                seen.append((state.global_step, time.time(), float(logs["num_input_tokens_seen"])))

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = peft_model(base_dir, cfg.lora)  # the worker's own model set-up
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.train.per_device_batch_size,
            learning_rate=cfg.train.learning_rate,
            max_steps=steps,
            logging_steps=LOG_EVERY,
            include_num_input_tokens_seen="all",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=cfg.train.seed,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=PadCollator(tok.pad_token_id or 0),
            callbacks=[Clock()],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": steady_rate(seen)}


LOG_EVERY = 5


def steady_rate(points: list[tuple[int, float, float]], skip: int = 10) -> float:
    """Tokens/s between the log at step >= ``skip`` and the last log: start-up
    (DeepSpeed engine, JIT-built ops, first batches) left out of both sides alike."""
    # one point per step, its first log: an eval or summary log of the same step comes
    # later with the same token count and would charge evaluation time to training
    by_step: dict[int, tuple[float, float]] = {}
    for step, t, tokens in sorted(points):
        by_step.setdefault(step, (t, tokens))
    steps = sorted(by_step)
    first = by_step[next(s for s in steps if s >= skip)]
    last = by_step[steps[-1]]
    return (last[1] - first[1]) / (last[0] - first[0])


def loraplex_run(cfg, settings, name: str, workers: int, cpus: int, steps: int) -> dict:
    import mlflow

    from loraplex.training.job import run_training

    cfg = cfg.model_copy(
        update={
            "name": name,
            "ray": cfg.ray.model_copy(update={"num_workers": workers, "cpus_per_worker": cpus}),
            "train": cfg.train.model_copy(
                update={
                    "max_steps": steps,
                    "save_steps": steps,
                    "eval_steps": steps,
                    "logging_steps": LOG_EVERY,
                }
            ),
            "mlflow": cfg.mlflow.model_copy(update={"registered_model": name}),
        }
    )
    with PeakRss() as mem:
        result = run_training(cfg, settings)
    history = mlflow.MlflowClient().get_metric_history(result.mlflow_run_id, "tokens")
    points = [(m.step, m.timestamp / 1000, m.value) for m in history]
    return {
        "seconds": result.metrics["train_seconds"],
        "tokens_per_s": steady_rate(points),
        "peak_rss_gib": mem.gib,
    }


def generate_all(model, tok, prompts: list[list[dict]], max_new: int) -> list[str]:
    from tqdm import tqdm

    out = []
    for messages in tqdm(prompts, desc="generating"):
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            gen = model.generate(
                **ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
            )
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def quality(settings, base_dir: Path, world: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.data.formats import read_conversations
    from loraplex.evaluation.scorers import exact_match, json_compliant, label_accuracy
    from loraplex.prompts import JSON_ANSWER_SCHEMA
    from loraplex.training.config import load_train_config
    from loraplex.training.job import run_training

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    results: dict = {}
    for task, config, max_new in (
        ("json_answer", "json_answer.yaml", 64),
        ("ticket_classify", "ticket_classify.yaml", 8),
    ):
        cfg = load_train_config(REPO / "jobs" / "configs" / config, (), settings.home)
        start = time.perf_counter()
        result = run_training(cfg, settings)
        train_s = time.perf_counter() - start
        tuned = (
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                result.adapter_location,
            )
            .merge_and_unload()
            .eval()
        )
        tests = read_conversations(world / "datasets" / task / "test.openai.jsonl")
        prompts = [c[:-1] for c in tests]
        golds = [c[-1]["content"] for c in tests]
        row: dict = {"test_examples": len(tests), "train_wall_s": train_s, **result.metrics}
        for label, model in (("base", base), ("adapter", tuned)):
            answers = generate_all(model, tok, prompts, max_new)
            if task == "json_answer":
                row[f"{label}_json_compliance"] = sum(
                    json_compliant(a, JSON_ANSWER_SCHEMA) for a in answers
                ) / len(answers)
                row[f"{label}_answer_em"] = sum(
                    exact_match(_answer(a), json.loads(g)["answer"])
                    for a, g in zip(answers, golds, strict=True)
                ) / len(answers)
                row[f"{label}_examples"] = answers[:3]
            else:
                row[f"{label}_accuracy"] = label_accuracy(answers, golds)
        results[task] = row
        print(json.dumps(row, indent=2), flush=True)
    return results


def _answer(text: str) -> str:
    try:
        value = json.loads(text)
        return str(value.get("answer", "")) if isinstance(value, dict) else ""
    except json.JSONDecodeError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument(
        "--config",
        type=Path,
        default=REPO / "jobs" / "configs" / "json_answer.yaml",
        help="The training config whose model and data the overhead runs use.",
    )
    ap.add_argument("--one-worker", action="store_true", help="Skip the 2-worker run.")
    ap.add_argument(
        "--stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="DeepSpeed ZeRO stage of the loraplex runs (default: the config's).",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("training.json"))
    args = ap.parse_args()
    os.environ["LORAPLEX_HOME"] = str(args.home)
    from loraplex.config import load_settings
    from loraplex.models.resolve import resolve_base_model
    from loraplex.training.config import load_train_config
    from loraplex.training.dataset import load_examples, tokenize

    settings = load_settings(overrides=[f"home={args.home}"])
    stage = () if args.stage is None else (f"deepspeed.stage={args.stage}",)
    cfg = load_train_config(args.config, stage, args.home)  # validated like `--set`
    zero = f"zero{cfg.deepspeed.stage}"
    base_dir, _ = resolve_base_model(cfg.base_model, settings)
    world = args.home / "worlds" / "seed-0"
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "home": str(args.home),
        "config": str(args.config),
    }
    if not args.skip_overhead:
        from transformers import AutoTokenizer

        ex = load_examples(cfg.data, cfg.train.seed)
        rows, _ = tokenize(AutoTokenizer.from_pretrained(base_dir), ex.train, cfg.data.max_length)
        with PeakRss() as mem:
            plain = plain_hf(cfg, base_dir, rows, [], args.steps)
        plain["peak_rss_gib"] = mem.gib
        one = loraplex_run(cfg, settings, "bench-overhead-1w", 1, 2, args.steps)
        results["overhead"] = {
            "steps": args.steps,
            "plain_hf_peft": plain,
            f"loraplex_1_worker_{zero}": one,
            "ratio_1_worker_vs_plain": one["tokens_per_s"] / plain["tokens_per_s"],
        }
        if not args.one_worker:
            two = loraplex_run(cfg, settings, "bench-overhead-2w", 2, 1, args.steps)
            results["overhead"][f"loraplex_2_workers_{zero}"] = two
        print(json.dumps(results["overhead"], indent=2), flush=True)
    if not args.skip_quality:
        results["quality"] = quality(settings, base_dir, world)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
