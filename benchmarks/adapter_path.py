"""Benchmark: what an adapter costs on top of the base model in vLLM on CPU, and where
it goes (issue: many adapters for real, item 5), with vLLM's own CPU LoRA ops and with
loraplex's (``loraplex.serving.cpu_lora``) side by side.

Each side runs in its own process with vLLM's engine in-process (no HTTP, no Ray: the
engine alone), prefix caching off so every prompt is prefilled, ``--prompt-tokens``-long
prompts (the demo's retrieval prompts are 465-489 tokens on SmolLM2) and a fixed
``--max-tokens`` answer (``ignore_eos``), on the dtype loraplex's ``auto`` gives this CPU:

1. **One request at a time**: the same prompts on the base and on a rank-``--rank``
   adapter (q/k/v/o, as the SmolLM2 adapters train): p50 seconds per request, the prefill
   alone (``max_tokens`` 1), and the adapter/base ratio.
2. **Where it goes**: one request each under ``torch.profiler``: the operators with the
   most CPU time (self), base against adapter.
3. **Mixed batches**: ``--concurrency`` prompts submitted at once on the base, on one
   adapter, and on 8 distinct adapters round-robin (8 engine slots): output tokens per
   second.

Usage: .venv/bin/python benchmarks/adapter_path.py --home HOME
       [--model smollm2-135m-instruct | embedded] [--rank 16 --prompts 8 --max-tokens 32
        --prompt-tokens 470 --concurrency 1 8 32 --out adapter_path.json]
(HOME: `loraplex models import smollm2-135m-instruct`, or `loraplex bootstrap`, done.)
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from adapters_at_scale import make_versions

SIDES = {"vllm": "vLLM's CPU LoRA ops", "loraplex": "loraplex's grouped ops (cpu_lora)"}
# seeded word salad for the prompts: the arithmetic per token does not depend on the words
WORDS = (
    "warranty price colour weight battery shipping north south warehouse bronze scarlet "
    "product model series support contact manual capacity voltage widget sensor cable "
    "dollars years months grams litres station panel module housing firmware release"
)


def prompts(tokenizer, n: int, length: int) -> list[dict]:
    """``n`` distinct prompts of exactly ``length`` tokens."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = WORDS.split()
        text = " ".join(rng.choice(words) for _ in range(length * 2))
        out.append({"prompt_token_ids": tokenizer(text)["input_ids"][:length]})
    return out


def worker(args) -> dict:
    """One side, in this process: vLLM's engine with the plugins the parent chose."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.serving.builder import engine_dtype
    from loraplex.serving.config import BaseModelSpec

    dtype = engine_dtype(BaseModelSpec(id="base"))
    llm = LLM(
        model=args.model_dir,
        max_model_len=2048,
        dtype=dtype,
        enable_lora=True,
        max_lora_rank=args.rank,
        max_loras=8,
        max_cpu_loras=8,
        enable_prefix_caching=False,
    )
    loras = [LoRARequest(f"v{i}", i, str(f)) for i, f in enumerate(args.adapters, start=1)]
    ps = prompts(llm.get_tokenizer(), max(args.prompts, max(args.concurrency)), args.prompt_tokens)
    full = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    one = SamplingParams(max_tokens=1, temperature=0)

    def run(batch: list[dict], params, lora) -> float:
        start = time.perf_counter()
        llm.generate(batch, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - start

    run(ps[:1], full, None)  # warm-up: the engine's first steps, every adapter loaded
    for lora in loras:
        run(ps[:1], one, lora)
    single: dict[str, dict[str, float]] = {}
    times = {k: [] for k in ("base", "adapter", "base_prefill", "adapter_prefill")}
    for p in ps[: args.prompts]:  # alternating, so drift hits both alike
        times["base"].append(run([p], full, None))
        times["adapter"].append(run([p], full, loras[0]))
        times["base_prefill"].append(run([p], one, None))
        times["adapter_prefill"].append(run([p], one, loras[0]))
    single = {k: statistics.median(v) for k, v in times.items()}

    profile = {}
    for name, lora in (("base", None), ("adapter", loras[0])):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(ps[:1], full, lora)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        profile[name] = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in rows[:8]
        ]

    mixed = []
    for c in args.concurrency:
        batch = ps[:c]
        for label, lora in (
            ("base", None),
            ("1 adapter", loras[0]),
            ("8 adapters", [loras[i % len(loras)] for i in range(c)]),
        ):
            s = run(batch, full, lora)
            rate = c * args.max_tokens / s
            mixed.append({"concurrency": c, "models": label, "tokens_per_s": rate})
    return {"dtype": dtype, "single": single, "profile": profile, "mixed": mixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=470)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", type=Path, default=Path("adapter_path.json"))
    ap.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # a worker
    ap.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        args.out.write_text(json.dumps(worker(args)))
        return

    name = "tiny-llama" if args.model == "embedded" else args.model
    model_dir = args.home / "models" / name
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: no base model at {model_dir} (import or bootstrap it first)")
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-path-"))
    print(f"making 8 rank-{args.rank} adapters on {name} in {work}", flush=True)
    adapters = make_versions(model_dir, work, 8, args.rank)
    results: dict = {"model": name, "args": {k: str(v) for k, v in vars(args).items()}}
    for side, label in SIDES.items():
        print(f"{label}: running (a minute or more)", flush=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
        env["TOKENIZERS_PARALLELISM"] = "false"
        if side == "vllm":
            env["VLLM_PLUGINS"] = "none"
        else:
            env.pop("VLLM_PLUGINS", None)
        out = work / f"{side}.json"
        cmd = [sys.executable, __file__, "--home", str(args.home), "--side", side]
        cmd += ["--model-dir", str(model_dir), "--out", str(out), "--rank", str(args.rank)]
        cmd += ["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--concurrency"]
        cmd += [str(c) for c in args.concurrency] + ["--adapters", *map(str, adapters)]
        log = work / f"{side}.log"
        with log.open("w") as f:
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"error: the {side} side failed; its log: {log}")
        results[side] = json.loads(out.read_text())
    args.out.write_text(json.dumps(results, indent=1))
    print_summary(results)


def print_summary(r: dict) -> None:
    a = r["args"]
    print(
        f"\n{r['model']}, {r['vllm']['dtype']}, rank {a['rank']}, {a['prompt_tokens']}-token "
        f"prompts, {a['max_tokens']} output tokens, engine in-process, prefix caching off\n"
    )
    print("| ops | base p50 s | adapter p50 s | ratio | prefill base / adapter s |")
    print("|---|---|---|---|---|")
    for side, label in SIDES.items():
        s = r[side]["single"]
        print(
            f"| {label} | {s['base']:.3f} | {s['adapter']:.3f} | "
            f"**{s['adapter'] / s['base']:.2f}x** | {s['base_prefill']:.3f} / "
            f"{s['adapter_prefill']:.3f} |"
        )
    for side, label in SIDES.items():
        print(f"\nTop operators, one request, {label} (self CPU ms, calls):\n")
        print("| base | adapter |\n|---|---|")
        for b, ad in zip(r[side]["profile"]["base"], r[side]["profile"]["adapter"], strict=True):
            print(
                f"| {b['op']} {b['self_ms']:.0f} ({b['calls']}) | "
                f"{ad['op']} {ad['self_ms']:.0f} ({ad['calls']}) |"
            )
    print("\nMixed batches, output tokens/s (all prompts submitted at once):\n")
    print("| concurrency | models | vLLM's ops | loraplex's ops |\n|---|---|---|---|")
    for v, o in zip(r["vllm"]["mixed"], r["loraplex"]["mixed"], strict=True):
        print(
            f"| {v['concurrency']} | {v['models']} | {v['tokens_per_s']:.1f} | "
            f"{o['tokens_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
