"""Benchmark of serving (issues: Serving; a real pretrained model). Same model, same
prompts, one run: the tiny bootstrap model (``--model embedded``, the default) or an
imported one (``--model smollm2-135m-instruct``, with the dtype ``serving/smollm2.yaml``'s
``auto`` gives on this CPU: float32 without native bfloat16).

1. bare ``vllm serve`` (vLLM's own OpenAI server) against loraplex (Ray Serve + the
   loraplex ingress + LLMServer) on the base model without retrieval, at concurrency
   1, 8 and 32: throughput (completion tokens/s) and p50/p95 request latency;
2. 8 adapters round-robin on both servers (``--phase bare-lora`` against ``--phase
   loraplex``), and through loraplex the adapters against the base model without LoRA;
3. the first (cold) request to each adapter against a second (warm) one;
4. a retrieval route against the same adapter without retrieval, on a collection of
   10,000 chunks (real MiniLM embeddings), per search mode.

Every request asks for exactly ``--tokens`` completion tokens (``ignore_eos``), so both
servers generate the same amount. The two servers run one after the other on the same
machine, never together.

Usage: .venv/bin/python benchmarks/serving.py --home HOME   (HOME: `loraplex bootstrap` done)
       .venv/bin/python benchmarks/serving.py --home HOME --model smollm2-135m-instruct
       (HOME: `loraplex models import smollm2-135m-instruct` done)
Prints markdown tables for benchmarks/RESULTS.md and writes serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import tiny_model_spec

PROMPTS = [
    "What is the price of the Urven E100?",
    "Tell me the warranty of the Brava K2.",
    "Who makes the Orbin lamp?",
    "What is the release year of the Zelt Z1000?",
    "Describe the support extension of the Urven line.",
    "What colour is the Junmo M5?",
    "How heavy is the Tarsi T3?",
    "What is the model code of the Velo V7?",
]


SERVED = "base"  # the model id both servers answer to


def adapter_names(model: str) -> list[str]:
    """The 8 adapters both sides serve (registered under these names for loraplex)."""
    prefix = "bench" if model == "embedded" else f"bench-{model}"
    return [f"{prefix}-{i}" for i in range(8)]


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p)) if values else float("nan")


async def load(
    url: str,
    models: list[str],
    concurrency: int,
    n: int,
    tokens: int,
    key: str = "none",
    extra: dict | None = None,
) -> dict:
    """n chat requests, ``concurrency`` at a time, models round-robin."""
    latencies: list[float] = []
    retrieval_ms: list[float] = []
    completion = 0
    queue = list(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal completion
        while queue:
            i = queue.pop()
            body = {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                **(extra or {}),
            }
            t = time.perf_counter()
            r = await client.post(f"{url}/chat/completions", json=body)
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            data = r.json()
            completion += data["usage"]["completion_tokens"]
            if (data.get("retrieval") or {}).get("latency_ms") is not None:
                retrieval_ms.append(data["retrieval"]["latency_ms"])

    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": wall,
        "tokens_per_s": completion / wall,
        "requests_per_s": n / wall,
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
        "retrieval_p50_ms": pct(retrieval_ms, 50),
    }


def wait_ready(url: str, timeout: float = 600, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def levels(url: str, models: list[str], args) -> list[dict]:
    """Each concurrency level of ``args``, the models round-robin, after a warm-up that
    sends every model at least two requests."""
    out = []
    asyncio.run(load(url, models, 8, max(16, 2 * len(models)), args.tokens))  # warm-up
    for c in args.concurrency:
        res = asyncio.run(load(url, models, c, max(args.requests, 8 * c), args.tokens))
        print(f"  c={c}: {res['tokens_per_s']:.1f} tok/s, p50 {res['p50_s']:.2f} s")
        out.append(res)
    return out


def bare_vllm(model_dir: Path, port: int, args, lora: bool = False) -> list[dict]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["VLLM_PLUGINS"] = "none"  # vLLM as shipped: not loraplex's CPU LoRA ops (cpu_lora)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED,
        "--max-model-len",
        "1024",
        "--dtype",
        args.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    models = [SERVED]
    if lora:  # the same LoRA settings loraplex gives vLLM when adapters are configured
        cmd += ["--enable-lora", "--max-loras", "8", "--max-cpu-loras", "8"]
        cmd += ["--max-lora-rank", "64"]
        # the 8 adapters the loraplex side serves (same seeds, same weights), round-robin
        from helpers import make_adapter

        folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
        models = adapter_names(args.model)
        cmd += ["--lora-modules"]
        cmd += [f"{n}={make_adapter(model_dir, folder / n, i)}" for i, n in enumerate(models)]
    log = open(Path(tempfile.gettempdir()) / "bench-vllm-serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url, proc=proc)
        print(f"bare vllm serve{' with 8 adapters round-robin' if lora else ''}:")
        return levels(url, models, args)
    finally:  # the server and its engine process: the whole process group we started
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        time.sleep(5)


def cold_and_warm(url: str, names: list[str], results: dict) -> None:
    """Part 3: the first request to each adapter against its second."""
    cold: list[float] = []
    warm: list[float] = []
    for name in names:
        one = {
            "model": f"{SERVED}:{name}",
            "max_tokens": 4,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
        }
        for bucket in (cold, warm):
            t = time.perf_counter()
            httpx.post(f"{url}/chat/completions", json=one, timeout=300).raise_for_status()
            bucket.append(time.perf_counter() - t)
    results["adapter_cold_s"] = statistics.median(cold)
    results["adapter_warm_s"] = statistics.median(warm)
    print(
        f"adapter first request {results['adapter_cold_s']:.2f} s, warm "
        f"{results['adapter_warm_s']:.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=48, help="Requests per level (≥ 8 x c).")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("serving.json"))
    ap.add_argument(
        "--model",
        default="embedded",
        help="Base model reference: embedded (the tiny model) or an imported name.",
    )
    ap.add_argument(
        "--phase",
        choices=["all", "bare", "bare-lora", "loraplex-base", "loraplex", "retrieval"],
        default="all",
        help="Run one half (results merge into --out); `all` runs bare vLLM in a child "
        "process first, so the two servers never share a process; `retrieval` runs only "
        "part 4 (a retrieval route against the same adapter without).",
    )
    ap.add_argument(
        "--skip-retrieval",
        action="store_true",
        help="--phase loraplex without part 4 (no 10k-chunk collection, no retrieval routes).",
    )
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="The engines' dtype on both sides (default: float32 for the tiny model; for "
        "an imported one what `dtype: auto` gives on this CPU).",
    )
    args = ap.parse_args()
    if args.dtype is None:  # what loraplex's `auto` gives vLLM on this CPU, on both sides
        from loraplex.serving.builder import engine_dtype
        from loraplex.serving.config import BaseModelSpec

        auto = engine_dtype(BaseModelSpec(id=SERVED))
        args.dtype = "float32" if args.model == "embedded" or auto == "float32" else "bfloat16"
    if args.phase == "all":
        for phase in ("bare", "bare-lora", "loraplex-base", "loraplex"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase]
            subprocess.run(cmd, check=True)
        return

    import ray
    from helpers import free_port, make_adapter
    from mlflow import MlflowClient
    from ray import serve
    from retrieval import write_corpus

    from loraplex import tracking
    from loraplex.config import load_settings
    from loraplex.models.adapters import register_external
    from loraplex.models.resolve import resolve_base_model
    from loraplex.retrieval.retriever import Retriever
    from loraplex.serving.builder import start
    from loraplex.serving.config import ServingConfig

    settings = load_settings(overrides=[f"home={args.home}"])
    model_dir, _ = resolve_base_model(args.model, settings)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["model"] = args.model
    results["tokens_per_request"] = args.tokens
    if args.phase in ("bare", "bare-lora"):
        lora = args.phase == "bare-lora"
        key = "bare_vllm_lora" if lora else "bare_vllm"
        results[key] = bare_vllm(model_dir, free_port(), args, lora=lora)
        args.out.write_text(json.dumps(results, indent=2))
        return

    # 10k chunks of product documents, real embeddings (idempotent on a second run)
    collection = f"bench_{args.chunks}"
    retrieval = args.phase == "retrieval" or (args.phase == "loraplex" and not args.skip_retrieval)
    if retrieval:
        with Retriever(settings) as r:
            if collection not in r.store.collections():
                files, _ = write_corpus(args.chunks, Path(tempfile.mkdtemp()) / "corpus")
                r.ingest(files, collection)
            results["chunks"] = r.store.info(collection).rows

    # 8 adapters in the registry (random LoRA weights: the cost is the same)
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    experiment = tracking.setup(settings)
    names = adapter_names(args.model)
    for i, name in enumerate(names):
        try:
            client.get_model_version_by_alias(name, "live")
        except Exception:
            folder = make_adapter(model_dir, Path(tempfile.mkdtemp()) / name, i)
            register_external(client, folder, name, model_dir, str(model_dir), "live", experiment)

    base_only = args.phase == "loraplex-base"  # no adapters: vLLM without LoRA, like bare
    cfg = ServingConfig.model_validate(
        {
            "models": [
                tiny_model_spec(
                    model_dir,
                    id=SERVED,
                    max_model_len=1024,
                    dtype=args.dtype,
                    max_adapters_per_replica=8,
                    scaling={"max_ongoing_requests": 256},
                )
            ],
            "adapters": []
            if base_only
            else [{"name": n, "base": SERVED, "registry": f"{n}@live"} for n in names],
            "routes": []
            if base_only or not retrieval
            else [
                {
                    "name": f"rag-{mode}",
                    "base": SERVED,
                    "adapter": names[0],
                    "retrieval": {"collection": collection, "top_k": 3, "mode": mode},
                }
                for mode in ("dense", "bm25", "hybrid")
            ]
            + [{"name": "plain", "base": SERVED, "adapter": names[0]}],
            # loopback only, like bare `vllm serve`; limits above what the load asks
            "auth": {"allow_anonymous": True, "default_limits": {}},
        }
    )
    url = start(cfg, settings, port=free_port())
    try:
        if base_only:
            print("loraplex without adapters:")
            results["loraplex_base"] = levels(url, [SERVED], args)
            return
        if args.phase != "retrieval":
            # part 2: the same 8 adapters round-robin as bare-lora (against the base model
            # without LoRA, --phase loraplex-base: the adapters' own cost, vLLM's)
            cold_and_warm(url, names, results)
            print("loraplex, 8 adapters round-robin:")
            results["loraplex"] = levels(url, [f"{SERVED}:{n}" for n in names], args)
        if retrieval:  # part 4
            rag = {}
            plain = asyncio.run(load(url, ["plain"], 1, 40, args.tokens))
            for mode in ("dense", "bm25", "hybrid"):
                res = asyncio.run(load(url, [f"rag-{mode}"], 1, 40, args.tokens))
                rag[mode] = {
                    "p50_s": res["p50_s"],
                    "plain_p50_s": plain["p50_s"],
                    "added_p50_ms": (res["p50_s"] - plain["p50_s"]) * 1000,
                    "retrieval_stage_p50_ms": res["retrieval_p50_ms"],
                }
                print(
                    f"retrieval {mode}: stage p50 {res['retrieval_p50_ms']:.1f} ms, "
                    f"added p50 {rag[mode]['added_p50_ms']:.1f} ms"
                )
            results["retrieval"] = rag
    finally:
        serve.shutdown()
        ray.shutdown()
        args.out.write_text(json.dumps(results, indent=2))
    if base_only:
        return
    print_tables(results)
    print(f"\nwrote {args.out}")


def print_tables(results: dict) -> None:
    pairs = [
        ("bare_vllm", "loraplex_base", "no LoRA"),
        ("bare_vllm_lora", "loraplex", "8 adapters round-robin"),
    ]
    print(
        "\n| vLLM | concurrency | bare tok/s | loraplex tok/s | ratio | bare p50 / p95 s | "
        "loraplex p50 / p95 s |\n|---|---|---|---|---|---|---|"
    )
    for bare_key, ours_key, label in pairs:
        for b, lp in zip(results.get(bare_key, []), results.get(ours_key, []), strict=False):
            print(
                f"| {label} | {b['concurrency']} | {b['tokens_per_s']:.0f} | "
                f"{lp['tokens_per_s']:.0f} | {lp['tokens_per_s'] / b['tokens_per_s']:.2f} | "
                f"{b['p50_s']:.2f} / {b['p95_s']:.2f} | {lp['p50_s']:.2f} / {lp['p95_s']:.2f} |"
            )
    base = {r["concurrency"]: r for r in results.get("loraplex_base", [])}
    for r in results.get("loraplex", []):
        if r["concurrency"] in base:
            ratio = r["tokens_per_s"] / base[r["concurrency"]]["tokens_per_s"]
            c = r["concurrency"]
            print(
                f"through loraplex, 8 adapters vs the base model without LoRA, c={c}: {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
