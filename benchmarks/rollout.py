"""Benchmark of safe adapter rollouts (issue: canary traffic, automatic rollback), on 127.0.0.1.

One loraplex application on the tiny bootstrap model with one adapter, ``steady``, served
from ``roll@stable`` with a canary ``roll@cand`` at ``--percent`` (10). Three versions of
``roll`` are registered: 1 (stable), 2 (a good candidate), 3 (a candidate whose
registry copy is damaged: every request to it fails with 503). Phases, each bounded:

1. **Split**: ``--requests`` (1,000) requests, each from a new end user
   (``x-loraplex-user``): the share the canary answered; then 50 users x 6 requests each:
   the share of users who always got the same version (stickiness).
2. **A broken candidate**: ``roll@cand`` moves to version 3 under a steady load
   (``--concurrency`` clients, new users): requests that reached it (503) before the
   automatic rollback, the time from its first failure to its last request, and the
   requests after that (all to version 1).
3. **Promotion under load**: ``roll@cand`` back to version 2, then, while the load runs,
   ``roll@stable`` moves to version 2: failed requests (target 0) and the time until
   every answer comes from version 2.

Usage: .venv/bin/python benchmarks/rollout.py --home HOME   (HOME: `loraplex bootstrap` done)
       [--requests 1000 --percent 10 --concurrency 8 --out rollout.json]
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import tiny_model_spec

KEY = "sk-rollout"
MSGS = [{"role": "user", "content": "Tell me about the kettle."}]


async def ask(client: httpx.AsyncClient, url: str, user: str) -> tuple[int, str, float]:
    """(status, version that answered or the error, seconds)."""
    started = time.monotonic()
    r = await client.post(
        f"{url}/chat/completions",
        json={"model": "tiny:steady", "messages": MSGS, "max_tokens": 2, "temperature": 0},
        headers={"authorization": f"Bearer {KEY}", "x-loraplex-user": user},
        timeout=120,
    )
    took = time.monotonic() - started
    if r.status_code == 200:
        return 200, r.json()["model"].rsplit("/", 1)[-1], took
    return r.status_code, r.text[:200], took


async def many(url: str, users: list[str], concurrency: int) -> list[tuple[int, str, float]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:

        async def one(u: str):
            async with sem:
                return await ask(client, url, u)

        return await asyncio.gather(*(one(u) for u in users))


async def steady(
    url: str, seconds: float, concurrency: int, during=None, at: float = 0
) -> list[tuple[float, int, str]]:
    """Load from new users for ``seconds``; ``during()`` runs once ``at`` seconds in.
    Returns (time since start, status, version or error) per request."""
    out: list[tuple[float, int, str]] = []
    t0 = time.monotonic()
    stop = t0 + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            status, what, _ = await ask(client, url, uuid.uuid4().hex)
            out.append((time.monotonic() - t0, status, what))

    async def trigger() -> None:
        if during is not None:
            await asyncio.sleep(at)
            await asyncio.to_thread(during)

    async with httpx.AsyncClient() as client:
        await asyncio.gather(trigger(), *(worker(client) for _ in range(concurrency)))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--percent", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--min-requests", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("rollout.json"))
    args = ap.parse_args()

    from helpers import free_port, make_adapter
    from mlflow import MlflowClient
    from ray import serve

    from loraplex import tracking
    from loraplex.config import load_settings
    from loraplex.models.adapters import register_external
    from loraplex.models.resolve import resolve_base_model
    from loraplex.serving.builder import start
    from loraplex.serving.config import ServingConfig
    from loraplex.serving.keys import hash_key

    settings = load_settings(overrides=[f"home={args.home}"])
    model_dir, base_ref = resolve_base_model("embedded", settings)
    tmp = Path(tempfile.mkdtemp())
    registry = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    experiment = tracking.setup(settings)
    name = f"roll-{uuid.uuid4().hex[:6]}"
    versions = []
    for seed in (1, 2, 3):
        folder = make_adapter(model_dir, tmp / f"v{seed}", seed)
        versions.append(
            register_external(registry, folder, name, model_dir, base_ref, None, experiment)
        )
    v1, v2, v3 = (str(v) for v in versions)
    stored = Path(registry.get_model_version(name, v3).source.removeprefix("file://"))
    weights = stored / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # version 3's registry copy is damaged
    registry.set_registered_model_alias(name, "stable", v1)
    registry.set_registered_model_alias(name, "cand", v2)

    cfg = ServingConfig.model_validate(
        {
            "models": [tiny_model_spec(model_dir, max_adapters_per_replica=4)],
            "adapters": [
                {
                    "name": "steady",
                    "base": "tiny",
                    "registry": f"{name}@stable",
                    "canary": {
                        "registry": f"{name}@cand",
                        "percent": args.percent,
                        "rollback": {"min_requests": args.min_requests, "window_s": 60},
                    },
                }
            ],
            "auth": {
                "keys": [
                    {
                        "name": "bench",
                        "sha256": hash_key(KEY),
                        "may_assert_users": True,  # the benchmark names its end users
                        "limits": {"max_concurrent": 256},
                    }
                ]
            },
            "alias_refresh_s": 1,
        }
    )
    url = start(cfg, settings, port=free_port())
    r: dict = {"percent": args.percent, "versions": [v1, v2, v3]}
    try:
        asyncio.run(many(url, [f"warm-{i}" for i in range(16)], 4))  # both versions loaded
        print(f"split: {args.requests} requests from new users")
        t = time.monotonic()
        got = asyncio.run(many(url, [f"user-{i}" for i in range(args.requests)], args.concurrency))
        r["split_seconds"] = round(time.monotonic() - t, 1)
        answered = Counter(what for status, what, _ in got if status == 200)
        r["split"] = {"answered": dict(answered), "failed": sum(s != 200 for s, _, _ in got)}
        r["canary_share_pct"] = round(100 * answered[v2] / max(1, sum(answered.values())), 2)
        users = [f"sticky-{i}" for i in range(50)]
        got = asyncio.run(many(url, users * 6, args.concurrency))
        seen: dict[str, set[str]] = {}
        for u, (_, what, _) in zip(users * 6, got, strict=True):
            seen.setdefault(u, set()).add(what)
        r["sticky_users_pct"] = round(100 * sum(len(v) == 1 for v in seen.values()) / 50, 1)

        print("a broken candidate under load")

        def break_canary() -> None:
            registry.set_registered_model_alias(name, "cand", v3)

        load = asyncio.run(steady(url, 45, args.concurrency, break_canary, at=5))
        broken = [t for t, status, _ in load if status == 503]
        after = [what for t, status, what in load if broken and t > broken[-1]]
        r["broken"] = {
            "requests": len(load),
            "failed_on_canary": len(broken),
            "first_failure_to_last_s": round(broken[-1] - broken[0], 2) if broken else None,
            "after_halt": dict(Counter(after)),
            "other_failures": sum(s not in (200, 503) for _, s, _ in load),
        }

        print("promotion of a good candidate under load")
        registry.set_registered_model_alias(name, "cand", v2)
        time.sleep(2)
        promoted: dict[str, float] = {}

        def promote() -> None:
            registry.set_registered_model_alias(name, "stable", v2)
            promoted["at"] = time.monotonic()

        t0 = time.monotonic()
        load = asyncio.run(steady(url, 30, args.concurrency, promote, at=10))
        at = promoted["at"] - t0
        old = [t for t, s, what in load if s == 200 and what == v1 and t > at]
        r["promotion"] = {
            "requests": len(load),
            "failed": sum(s != 200 for _, s, _ in load),
            "last_v1_answer_after_s": round(max(old) - at, 2) if old else 0.0,
            "answered": dict(Counter(what for _, s, what in load if s == 200)),
        }
    finally:
        serve.shutdown()
        args.out.write_text(json.dumps(r, indent=2))
    print_summary(r)


def print_summary(r: dict) -> None:
    b, p = r["broken"], r["promotion"]
    print(
        f"| canary share over {sum(r['split']['answered'].values())} new users | "
        f"{r['canary_share_pct']}% (configured {r['percent']:g}%) |\n"
        f"| users who always got one version (50 users x 6) | {r['sticky_users_pct']}% |\n"
        f"| broken candidate: requests that reached it | {b['failed_on_canary']} |\n"
        f"| broken candidate: first failure to its last request | "
        f"{b['first_failure_to_last_s']} s |\n"
        f"| after the halt | {b['after_halt']} |\n"
        f"| promotion under load: failed requests | {p['failed']} of {p['requests']} |\n"
        f"| promotion: last answer of the old version after the move | "
        f"{p['last_v1_answer_after_s']} s |"
    )


if __name__ == "__main__":
    main()
