"""How well a JSON-answer adapter (or the base model) reads, without serving it.

Greedy answers (transformers, CPU) to a held-out world's test questions, with the gold
document in the prompt (``--mode json``: the adapter's JSON task; ``--mode text``: the
base model's plain answer) or with no source at all (``--mode closed``: the format alone).
Prints exact match and JSON-schema compliance. A quick check between adapter trainings
(seconds, against minutes for `loraplex eval` through a server); the four-way
evaluation is the figure of record.

Usage: .venv/bin/python benchmarks/adapter_reading.py --home DIR [--adapter models:/json-answer/3]
       [--mode json|text|closed] [--eval-seed 7] [--questions 80]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import mlflow
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.evaluation.scorers import exact_match, json_compliant
from loraplex.prompts import JSON_ANSWER_SCHEMA, Source, question_prompt


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--adapter", default=None, help="models:/NAME/VERSION; none: the base model")
    ap.add_argument("--mode", choices=("json", "text", "closed"), default="json")
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--questions", type=int, default=80)
    args = ap.parse_args()

    world = args.home / "worlds" / f"seed-{args.eval_seed}"
    if not (world / "manifest.json").exists():
        raise SystemExit(f"no world in {world}: run `loraplex world generate` or the demo first")
    docs = {d["_id"]: d for d in _jsonl(world / "corpus.jsonl")}
    questions = [q for q in _jsonl(world / "queries.jsonl") if q["metadata"]["split"] == "test"]
    questions = questions[: args.questions]

    base = args.home / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        mlflow.set_tracking_uri(f"sqlite:///{args.home}/mlflow.db")
        folder = Path(mlflow.artifacts.download_artifacts(args.adapter))
        adapter_dir = next(p.parent for p in folder.rglob("adapter_config.json"))
        model = PeftModel.from_pretrained(model, adapter_dir).eval()

    started, exact, compliant, misses = time.perf_counter(), 0.0, 0, []
    for q in questions:
        gold = docs[q["metadata"]["gold_doc"]]
        sources = [] if args.mode == "closed" else [Source(gold["_id"], gold["text"])]
        prompt = question_prompt(q["text"], sources, json_answer=args.mode != "text")
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)
        reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answer = reply.split("[")[0]
        if args.mode != "text":
            compliant += json_compliant(reply, JSON_ANSWER_SCHEMA)
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                answer = json.loads(reply)["answer"]
        hit = exact_match(answer, q["metadata"]["answer"])
        exact += hit
        if not hit and len(misses) < 5:
            misses.append((q["metadata"]["answer"], reply))
    n = len(questions)
    print(
        f"{args.adapter or 'base model'} ({args.mode}, seed {args.eval_seed}): "
        f"exact match {exact / n:.3f}"
        + (f", JSON compliance {compliant / n:.3f}" if args.mode != "text" else "")
        + f" on {n} questions ({time.perf_counter() - started:.0f} s)"
    )
    for gold_answer, reply in misses:
        print(f"  expected {gold_answer!r}, got {reply!r}")


if __name__ == "__main__":
    main()
