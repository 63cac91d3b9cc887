"""Benchmark of the embedded base model (issue: the embedded default).

Measures, in one run:
1. `loraplex bootstrap --force` from nothing: wall time and peak memory (RSS summed over
   the whole process tree: the CLI, Ray and its Train workers);
2. on a world drawn with a seed never used in training or tests (default 1000): exact
   match (normalised) on every fact question with the gold passage in the prompt, and
   without any passage;
3. greedy agreement of vLLM (CPU) and transformers on the first 16 tokens of 50 prompts.

Usage: .venv/bin/python benchmarks/basemodel.py [--home DIR] [--seed 1000] [--skip-bootstrap]
       [--set KEY=VALUE ...]   (pretraining overrides, as for `loraplex bootstrap --set`)
Prints a markdown table to paste into benchmarks/RESULTS.md and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.evaluation.scorers import exact_match
from loraplex.models.parity import agreement, chat_prompts, hf_greedy, vllm_greedy
from loraplex.prompts import Source, question_prompt
from loraplex.world.generate import generate_world


def run_bootstrap(home: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "LORAPLEX_HOME": str(home)}
    loraplex = str(Path(sys.executable).with_name("loraplex"))
    start = time.perf_counter()
    args = [a for o in overrides for a in ("--set", o)]
    proc = psutil.Popen([loraplex, "bootstrap", "--force", *args], env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"bootstrap failed with exit code {code}")
    return {"bootstrap_wall_s": time.perf_counter() - start, "bootstrap_peak_rss_gib": peak / 2**30}


def answer_accuracy(model_dir: Path, world: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    corpus = {json.loads(x)["_id"]: json.loads(x) for x in (world / "corpus.jsonl").open()}
    queries = [json.loads(x) for x in (world / "queries.jsonl").open()]
    scores: dict[str, list[float]] = {"with_gold_passage": [], "without_passage": []}
    for q in tqdm(queries, desc="fact questions"):
        gold = q["metadata"]["gold_doc"]
        for key, sources in (
            ("with_gold_passage", [Source(gold, corpus[gold]["text"])]),
            ("without_passage", []),
        ):
            messages = [{"role": "user", "content": question_prompt(q["text"], sources)}]
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(
                    **ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
                )
            answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            scores[key].append(exact_match(answer, q["metadata"]["answer"]))
    return {f"em_{k}": sum(v) / len(v) for k, v in scores.items()} | {"questions": len(queries)}


def parity(model_dir: Path, world: Path, n: int = 50) -> dict:
    queries = [json.loads(x) for x in (world / "queries.jsonl").open()]
    corpus = {json.loads(x)["_id"]: json.loads(x) for x in (world / "corpus.jsonl").open()}
    rng = random.Random(0)
    chosen = rng.sample(queries, n)
    messages = [
        question_prompt(
            q["text"],
            [Source(q["metadata"]["gold_doc"], corpus[q["metadata"]["gold_doc"]]["text"])]
            if i % 2 == 0
            else [],
        )
        for i, q in enumerate(chosen)
    ]
    prompts = chat_prompts(model_dir, messages)
    a = vllm_greedy(model_dir, prompts, 16)
    b = hf_greedy(model_dir, prompts, 16)
    return {"vllm_hf_agreement_16_tokens": agreement(a, b, 16), "parity_prompts": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-home-")))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--skip-bootstrap", action="store_true")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Pretraining override passed to `loraplex bootstrap --set`.",
    )
    args = ap.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "home": str(args.home), "seed": args.seed}
    if not args.skip_bootstrap:
        results |= run_bootstrap(args.home, args.overrides)
        results["overrides"] = args.overrides
    model_dir = args.home / "models" / "tiny-llama"
    world = Path(tempfile.mkdtemp(prefix="bench-world-")) / f"seed-{args.seed}"
    generate_world(args.seed, world)
    results |= answer_accuracy(model_dir, world)
    results |= parity(model_dir, world)
    out = Path(__file__).with_name("basemodel.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
