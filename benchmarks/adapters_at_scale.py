"""Benchmark: hundreds of adapter versions on one base through the bounded tiers (issue:
many adapters for real), against 127.0.0.1.

One PEFT adapter of ``--rank`` is made on the base (random B, as the tests make them) and
``--versions`` versions of it registered, each with its B matrices scaled differently
(distinct weights, distinct answers). One loraplex application serves them all through
``--slots`` adapters per replica (vLLM ``max_loras`` / ``max_cpu_loras``) and a node disk
cache of ``--disk-entries`` versions. Every request pins its version
(``adapter_version``), and every answer's ``model`` is checked against it.

1. **Cold loads by tier**: ``--cold`` versions never seen (files from the registry), then
   the same versions again after the replica let them go but the disk kept them (files
   from the disk cache); each against a warm request to the same version. Reported: the
   cold request's extra seconds over the warm one, p50/p95 per tier.
2. **Cold loads beside hot traffic**: 2 clients on 2 hot versions for ``--burst-s``
   seconds alone, then as long again beside a client loading a cold version after another.
   Reported: the hot p95 both times (goal: within 1.2x).
3. **Churn**: ``--minutes`` of Zipf-distributed requests (s = ``--zipf``) over every
   version at ``--concurrency``. Reported: requests, errors, answers naming another
   version, and, every 30 s, the RSS of the replica processes, the bytes in the disk cache
   and the versions the replica holds (loads - evictions).

Usage: .venv/bin/python benchmarks/adapters_at_scale.py --home HOME
       [--model embedded | smollm2-135m-instruct] [--versions 200 --slots 4
        --disk-entries 40 --rank 16 --minutes 5 --concurrency 4 --out adapters_at_scale.json]
(HOME: `loraplex bootstrap`, or `loraplex models import smollm2-135m-instruct`, done.)
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import tiny_model_spec

KEY = "sk-bench-many"
NAME = "many"
MSGS = [{"role": "user", "content": "The warranty of the Velmo X200 is"}]


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p)) if values else float("nan")


def make_versions(base_dir: Path, out: Path, versions: int, rank: int) -> list[Path]:
    """``versions`` PEFT folders: one random LoRA of ``rank``, its B matrices scaled."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    first = out / "source"
    get_peft_model(model, config).save_pretrained(first)
    weights = load_file(str(first / "adapter_model.safetensors"))
    folders = []
    for v in range(1, versions + 1):
        folder = out / f"v{v}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
        factor = 0.5 + v / versions
        scaled = {k: (t * factor if "lora_B" in k else t) for k, t in weights.items()}
        save_file(scaled, str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(timeout=300, headers={"authorization": f"Bearer {KEY}"})

    async def ask(self, version: int, tokens: int = 1) -> tuple[int, float, str]:
        """(status, seconds, the model that answered)."""
        body = {
            "model": f"base:{NAME}",
            "messages": MSGS,
            "max_tokens": tokens,
            "temperature": 0,
            "adapter_version": str(version),
        }
        started = time.perf_counter()
        try:
            r = await self.http.post(f"{self.url}/chat/completions", json=body)
        except httpx.HTTPError:
            return -1, time.perf_counter() - started, ""
        model = r.json().get("model", "") if r.status_code == 200 else r.text[:200]
        return r.status_code, time.perf_counter() - started, model


async def cold_by_tier(url: str, versions: list[int], slots: int) -> dict:
    """Cold (registry), then cold (disk) loads of ``versions``, each against a warm one."""
    c = Client(url)
    out: dict[str, list[float]] = {"registry": [], "disk": []}
    try:
        for tier in ("registry", "disk"):
            for v in versions:
                status, cold, model = await c.ask(v)
                assert status == 200 and model.endswith(f"/{v}"), (status, model)
                _, warm, _ = await c.ask(v)
                out[tier].append(cold - warm)
            # the replica lets these go (others take its slots); the disk keeps them
            for v in range(versions[-1] + 1, versions[-1] + 1 + slots):
                await c.ask(v)
    finally:
        await c.http.aclose()
    return {
        tier: {"n": len(xs), "p50_s": pct(xs, 50), "p95_s": pct(xs, 95)} for tier, xs in out.items()
    }


async def hot_beside_cold(url: str, hot: list[int], cold: list[int], seconds: float) -> dict:
    async def hot_loop(c: Client, v: int, end: float, lat: list[float], bad: Counter) -> None:
        while time.monotonic() < end:
            status, s, model = await c.ask(v, tokens=8)
            if status == 200 and model.endswith(f"/{v}"):
                lat.append(s)
            else:
                bad[str(status)] += 1

    async def phase(with_cold: bool) -> dict:
        clients = [Client(url) for _ in range(3)]
        end = time.monotonic() + seconds
        lat: list[float] = []
        bad: Counter = Counter()
        cold_loads = 0

        async def cold_loop() -> None:
            nonlocal cold_loads
            for v in cold:
                if time.monotonic() >= end:
                    return
                await clients[2].ask(v)
                cold_loads += 1

        tasks = [hot_loop(clients[i], hot[i], end, lat, bad) for i in range(2)]
        if with_cold:
            tasks.append(cold_loop())
        try:
            await asyncio.gather(*tasks)
        finally:
            for c in clients:
                await c.http.aclose()
        return {
            "hot_requests": len(lat),
            "hot_p50_s": pct(lat, 50),
            "hot_p95_s": pct(lat, 95),
            "hot_errors": dict(bad),
            "cold_loads": cold_loads,
        }

    return {"alone": await phase(False), "beside_cold_loads": await phase(True)}


def metrics_sample(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    total: Counter = Counter()
    for line in text.splitlines():
        m = re.match(r"^(ray_loraplex_adapter_(loads|evictions)_total)\{.*\} ([0-9.e+]+)$", line)
        if m:
            total[m[2]] += float(m[3])
        m = re.match(r"^ray_loraplex_adapter_cache_bytes\{.*\} ([0-9.e+]+)$", line)
        if m:
            total["disk_bytes"] = float(m[1])
    return {"held_by_replica": total["loads"] - total["evictions"], **total}


async def churn(url: str, n: int, s: float, minutes: float, concurrency: int, watch) -> dict:
    weights = np.array([1 / k**s for k in range(1, n + 1)])
    weights /= weights.sum()
    rng = random.Random(0)
    order = list(range(1, n + 1))
    rng.shuffle(order)  # which version has which popularity rank
    status: Counter = Counter()
    wrong: list[str] = []
    latencies: list[float] = []
    end = time.monotonic() + minutes * 60
    samples: list[dict] = []

    async def worker(i: int) -> None:
        c = Client(url)
        local = random.Random(i)
        try:
            while time.monotonic() < end:
                v = order[int(np.searchsorted(np.cumsum(weights), local.random()))]
                code, sec, model = await c.ask(v, tokens=4)
                status[str(code)] += 1
                if code == 200:
                    latencies.append(sec)
                    if model.rsplit("/", 1)[-1] != str(v):  # base:<registered name>/<v>
                        wrong.append(f"asked {v}, answered {model}")
        finally:
            await c.http.aclose()

    async def sampler() -> None:
        started = time.monotonic()
        while time.monotonic() < end:
            samples.append({"t_s": round(time.monotonic() - started), **watch()})
            await asyncio.sleep(30)

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return {
        "requests": sum(status.values()),
        "status": dict(status),
        "wrong_version": len(wrong),
        "wrong_examples": wrong[:5],
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--versions", type=int, default=200)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--disk-entries", type=int, default=40)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--burst-s", type=float, default=60)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("adapters_at_scale.json"))
    args = ap.parse_args()

    import ray
    from helpers import free_port
    from load import replica_rss
    from mlflow import MlflowClient
    from ray import serve

    from loraplex import tracking
    from loraplex.config import load_settings
    from loraplex.models.adapters import register_external
    from loraplex.models.resolve import resolve_base_model
    from loraplex.serving.builder import engine_dtype, start
    from loraplex.serving.config import BaseModelSpec, ServingConfig
    from loraplex.serving.keys import hash_key

    settings = load_settings(overrides=[f"home={args.home}"])
    model_dir, _ = resolve_base_model(args.model, settings)
    results: dict = {"config": {k: str(v) for k, v in vars(args).items()}}

    started = time.perf_counter()
    folders = make_versions(
        model_dir, args.home / "bench-many" / args.model, args.versions, args.rank
    )
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    experiment = tracking.setup(settings)
    name = f"{NAME}-{args.model}-r{args.rank}"
    have = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    if len(have) < args.versions:
        from tqdm import tqdm

        for folder in tqdm(folders[len(have) :], desc="registering versions"):
            register_external(client, folder, name, model_dir, str(model_dir), "newest", experiment)
    results["register_s"] = time.perf_counter() - started
    entry = sum(f.stat().st_size for f in folders[0].iterdir()) + 4096
    results["version_bytes"] = entry - 4096

    spec = tiny_model_spec(model_dir, max_adapters_per_replica=args.slots, max_lora_rank=args.rank)
    if args.model != "embedded":
        spec |= {"max_model_len": 2048, "dtype": engine_dtype(BaseModelSpec(id="base"))}
    spec["id"] = "base"
    cfg = ServingConfig.model_validate(
        {
            "models": [spec],
            "adapters": [{"name": NAME, "base": "base", "registry": f"{name}@newest"}],
            "retriever": None,
            "adapter_cache": {"disk_gib": args.disk_entries * entry / 2**30},
            "auth": {
                "keys": [
                    {
                        "name": "bench",
                        "sha256": hash_key(KEY),
                        "may_pin_versions": True,
                        # the benchmark measures the tiers, never the key's limits
                        "limits": {
                            "max_concurrent": 256,
                            "requests_per_minute": None,
                            "tokens_per_minute": None,
                        },
                    }
                ]
            },
        }
    )
    url = start(cfg, settings, port=free_port())
    node = ray._private.worker.global_worker.node
    metrics_url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"

    def watch() -> dict:
        return {"rss_gib": replica_rss(), **metrics_sample(metrics_url)}

    try:
        asyncio.run(Client(url).ask(args.versions))  # warm-up: the engine's first request
        print(f"cold loads by tier ({args.cold} versions)")
        cold = list(range(1, args.cold + 1))
        results["cold_load_extra_s"] = asyncio.run(cold_by_tier(url, cold, args.slots))
        print(f"hot traffic alone, then beside cold loads ({args.burst_s:.0f} s each)")
        hot = [args.versions - 1, args.versions]
        fresh = list(range(args.cold + args.slots + 1, args.versions - 1))
        results["hot_beside_cold"] = asyncio.run(hot_beside_cold(url, hot, fresh, args.burst_s))
        print(f"Zipf churn over {args.versions} versions ({args.minutes} min)")
        results["churn"] = asyncio.run(
            churn(url, args.versions, args.zipf, args.minutes, args.concurrency, watch)
        )
    finally:
        serve.shutdown()
        args.out.write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_summary(r: dict) -> None:
    c, h, z = r["cold_load_extra_s"], r["hot_beside_cold"], r["churn"]
    a, b = h["alone"], h["beside_cold_loads"]
    print(
        f"\n{r['config']['versions']} versions ({r['version_bytes'] / 2**20:.2f} MiB each, "
        f"registered in {r['register_s']:.0f} s); {r['config']['slots']} per replica, "
        f"{r['config']['disk_entries']} on disk\n"
        "| cold load from | n | extra p50 s | extra p95 s |\n|---|---|---|---|\n"
        + "".join(
            f"| {t} | {v['n']} | {v['p50_s']:.3f} | {v['p95_s']:.3f} |\n" for t, v in c.items()
        )
        + f"\nhot p95 alone {a['hot_p95_s']:.3f} s, beside {b['cold_loads']} cold loads "
        f"{b['hot_p95_s']:.3f} s (ratio {b['hot_p95_s'] / a['hot_p95_s']:.2f}); hot errors "
        f"{a['hot_errors']} / {b['hot_errors']}\n"
        f"churn: {z['requests']} requests, status {z['status']}, wrong version "
        f"{z['wrong_version']}, p50 {z['p50_s']:.3f} s, p95 {z['p95_s']:.3f} s"
    )
    for s in z["samples"]:
        print(f"  t={s['t_s']} s: {s}")


if __name__ == "__main__":
    main()
