"""Benchmark: 200 slow-body clients beside normal traffic (issue: hostile clients), on
127.0.0.1.

A slow-body client sends its request line and headers (a valid key, a ``Content-Length``
of 10,000 bytes), then one byte a second, as a client on a bad link (or an attacker
holding slots) would. The server admits a request against its key's limits before
reading the body and cuts the read at ``http.body_read_s`` with a 408. One loraplex
application on the tiny bootstrap model, two keys: ``normal`` (the measured traffic) and
``slow`` (the slow clients; ``--slow-concurrent`` slots, 256 by default so every slow
client is admitted and holds an ingress slot until its 408: the worst case).

Phases, each stopping by itself: a warm-up; ``--seconds`` of normal traffic alone
(``--clients`` closed-loop clients, the same short chat); ``--seconds`` of the same
traffic with ``--slow`` slow clients held open the whole time (each reconnects after
its answer). Reported: the normal traffic's p50/p95 alone and beside the slow clients
(goal: p95 within 1.2x), the slow clients' answers by status and how long each held its
connection, and the normal traffic's errors.

Usage: .venv/bin/python benchmarks/slow_clients.py --home HOME   (`loraplex bootstrap` done)
       [--slow 200 --clients 4 --seconds 60 --body-read-s 10 --out slow_clients.json]
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import tiny_model_spec

KEY_NORMAL = "sk-slow-bench-normal"
KEY_SLOW = "sk-slow-bench-slow"
BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "What is the price of the Urven E100?"}],
    "max_tokens": 16,
    "ignore_eos": True,
}


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p)) if values else float("nan")


async def normal_traffic(url: str, clients: int, seconds: float) -> dict:
    """Closed loop of identical short chats from the normal key."""
    latencies: list[float] = []
    status: Counter[int] = Counter()
    end = time.monotonic() + seconds

    async def client() -> None:
        headers = {"authorization": f"Bearer {KEY_NORMAL}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as http:
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    code = (await http.post(f"{url}/chat/completions", json=BODY)).status_code
                except httpx.HTTPError:
                    code = -1
                status[code] += 1
                if code == 200:
                    latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "requests": sum(status.values()),
        "status": {str(k): v for k, v in sorted(status.items())},
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
    }


async def slow_client(host: str, port: int, end: float, status: Counter, held: list) -> None:
    """Open a request, send its body a byte a second until the server answers; again."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {KEY_SLOW}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 10000\r\n\r\n"
    ).encode()
    while time.monotonic() < end:
        opened = time.monotonic()
        code = 0
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            status["connect failed"] += 1
            await asyncio.sleep(1)
            continue
        try:
            writer.write(head)
            while not code and time.monotonic() < end:
                writer.write(b" ")  # JSON whitespace: valid, and never done
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), 1.0)
                except TimeoutError:
                    continue
                code = int(line.split()[1]) if line.startswith(b"HTTP/") else -1
        except OSError:
            code = -2  # the server closed the connection mid-body
        finally:
            writer.close()
        if code:
            status[str(code)] += 1
            held.append(time.monotonic() - opened)


async def with_slow_clients(url: str, clients: int, slow: int, seconds: float) -> dict:
    u = urlparse(url)
    status: Counter = Counter()
    held: list[float] = []
    end = time.monotonic() + seconds
    slow_tasks = [
        asyncio.ensure_future(slow_client(u.hostname, u.port, end, status, held))
        for _ in range(slow)
    ]
    await asyncio.sleep(3)  # every slow client connected and admitted first
    normal = await normal_traffic(url, clients, seconds - 3)
    await asyncio.gather(*slow_tasks)
    normal["slow_clients"] = {
        "clients": slow,
        "answers": dict(status),
        "held_s_p50": pct(held, 50),
        "held_s_max": max(held) if held else float("nan"),
    }
    return normal


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part: Serve's HTTP proxy, the
    ingress replica, the engine (replica, vLLM engine core and workers) and this
    benchmark's own process (its clients)."""
    import os

    import psutil

    out: dict[str, float] = {"proxy": 0.0, "ingress": 0.0, "engine": 0.0, "clients": 0.0}
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            title = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            if proc.info["pid"] == os.getpid():
                part = "clients"
            elif "ProxyActor" in title:
                part = "proxy"
            elif "LoraplexIngress" in title:
                part = "ingress"
            elif "LLMServer" in title or "EngineCore" in title or "VLLM" in title.upper():
                part = "engine"
            else:
                continue
            t = proc.cpu_times()
            out[part] += t.user + t.system
        except psutil.Error:
            continue
    return out


def timed(phase) -> dict:
    """Run ``phase`` (a coroutine) and add the CPU seconds each part used meanwhile."""
    before, started = cpu_seconds(), time.perf_counter()
    result = asyncio.run(phase)
    after, wall = cpu_seconds(), time.perf_counter() - started
    result["cpu_s"] = {k: round(after[k] - before[k], 1) for k in before}
    result["wall_s"] = round(wall, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--body-read-s", type=float, default=10)
    ap.add_argument("--slow-concurrent", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("slow_clients.json"))
    args = ap.parse_args()

    from helpers import free_port
    from ray import serve

    from loraplex.config import load_settings
    from loraplex.models.resolve import resolve_base_model
    from loraplex.serving.builder import start
    from loraplex.serving.config import ServingConfig
    from loraplex.serving.keys import hash_key

    settings = load_settings(overrides=[f"home={args.home}"])
    model_dir, _ = resolve_base_model("embedded", settings)
    cfg = ServingConfig.model_validate(
        {
            "models": [tiny_model_spec(model_dir)],
            "retriever": None,
            "http": {"body_read_s": args.body_read_s},
            "auth": {
                "keys": [
                    {
                        "name": "normal",
                        "sha256": hash_key(KEY_NORMAL),
                        "models": ["tiny"],
                        # the measured traffic is never refused: its latency is the figure
                        "limits": {"requests_per_minute": None, "tokens_per_minute": None},
                    },
                    {
                        "name": "slow",
                        "sha256": hash_key(KEY_SLOW),
                        "models": ["tiny"],
                        "limits": {"max_concurrent": args.slow_concurrent},
                    },
                ]
            },
        }
    )
    url = start(cfg, settings, port=free_port())
    results: dict = {"config": vars(args) | {"home": str(args.home), "out": str(args.out)}}
    try:
        print("warm-up (20 s)")
        asyncio.run(normal_traffic(url, args.clients, 20))
        print(f"normal traffic alone ({args.seconds:.0f} s)")
        results["alone"] = timed(normal_traffic(url, args.clients, args.seconds))
        print(f"normal traffic beside {args.slow} slow-body clients ({args.seconds:.0f} s)")
        results["beside_slow"] = timed(
            with_slow_clients(url, args.clients, args.slow, args.seconds)
        )
    finally:
        serve.shutdown()
        args.out.write_text(json.dumps(results, indent=2))
    a, b = results["alone"], results["beside_slow"]
    s = b["slow_clients"]
    print(
        f"\n| normal traffic ({args.clients} clients) | requests | status | p50 s | p95 s |\n"
        "|---|---|---|---|---|\n"
        f"| alone | {a['requests']} | {a['status']} | {a['p50_s']:.3f} | {a['p95_s']:.3f} |\n"
        f"| beside {s['clients']} slow-body clients | {b['requests']} | {b['status']} | "
        f"{b['p50_s']:.3f} | {b['p95_s']:.3f} |\n\n"
        f"p95 ratio {b['p95_s'] / a['p95_s']:.2f}; slow clients' answers {s['answers']}, "
        f"held {s['held_s_p50']:.1f} s (p50), {s['held_s_max']:.1f} s (max)\n"
        f"CPU seconds alone {a['cpu_s']} in {a['wall_s']} s; beside the slow clients "
        f"{b['cpu_s']} in {b['wall_s']} s"
    )


if __name__ == "__main__":
    main()
