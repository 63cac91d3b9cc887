"""Benchmark of serving many teams (issue: tenants and overload), against 127.0.0.1.

One loraplex application on the tiny bootstrap model, two keys on two tenants of one
collection, one key rate-limited, and two phases that stop by themselves:

1. **Mixed load** (``--minutes``, default 10) at ``--concurrency`` (16) after a warm-up:
   chat with and without retrieval, streams (1 in 20 cancelled after two events), JSON
   schema answers, embeddings, and 1 request in 10 malformed, spread over both keys.
   Before it, the same mix from the unlimited key alone (``--solo-minutes``) gives the
   p95 that the mixed run is compared with. Reported: responses by status and key, 5xx
   other than deliberate 503 sheds, every 429's key, chunks of the other tenant found
   in any response (by doc id and by a marker string only team B's documents hold),
   ingress and engine replica RSS after warm-up and after the run, and p95 latency of
   the unlimited key with and without the limited key's traffic.
2. **Overload**: the engine runs ``--engine-ongoing`` requests at once and queues as
   many; capacity is measured at that concurrency, then 4x as many clients send the
   same requests: the share shed (503/429) and the p95 of the admitted ones.

Usage: .venv/bin/python benchmarks/load.py --home HOME   (HOME: `loraplex bootstrap` done)
       [--minutes 10 --solo-minutes 2 --concurrency 16 --out load.json]
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import tiny_model_spec

KEY_A = "sk-load-team-a"
KEY_B = "sk-load-team-b"
MARKER_B = "TEAMB-ONLY"
QUESTIONS = [
    "What is the price of the Urven E100?",
    "Tell me the warranty of the Brava K2.",
    "Who makes the Orbin lamp?",
    "What is the release year of the Zelt Z1000?",
]
MALFORMED: list[bytes | dict] = [
    b'{"model": "tiny", "messages": [',
    {"model": "tiny", "messages": ["hi"]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"model": "kb", "messages": [{"role": "user", "content": "x"}], "stream_options": "x"},
    {"model": "kb", "messages": [{"role": "user", "content": "x"}], "retrieval": {"top_k": 99}},
    {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    b'{"model": "tiny", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p)) if values else float("nan")


class Tally:
    """Everything one phase saw."""

    def __init__(self) -> None:
        self.status: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[float]] = {"A": [], "B": []}
        self.leaks: list[str] = []
        self.unexpected: list[str] = []
        self.shed: Counter[str] = Counter()  # 503 reasons, first words

    def summary(self) -> dict:
        by_key: dict[str, dict[str, int]] = {}
        for (key, status), n in sorted(self.status.items()):
            by_key.setdefault(key, {})[str(status)] = n
        return {
            "status_by_key": by_key,
            "server_errors_not_shed": sum(
                n for (_, s), n in self.status.items() if s >= 500 and s != 503
            ),
            "429_by_key": {k: v.get("429", 0) for k, v in by_key.items()},
            "cross_tenant_chunks": len(self.leaks),
            "leak_examples": self.leaks[:5],
            "unexpected": self.unexpected[:10],
            "503_reasons": dict(self.shed.most_common(5)),
            "p50_s": {k: pct(v, 50) for k, v in self.latency.items()},
            "p95_s": {k: pct(v, 95) for k, v in self.latency.items()},
            "requests": sum(self.status.values()),
        }


def check_sources(who: str, data: dict, team_b_docs: set[str], tally: Tally) -> None:
    for s in data.get("sources") or []:
        theirs = s.get("doc_id") in team_b_docs or MARKER_B in (s.get("text") or "")
        if (who == "A") == theirs:  # A must see no B chunk, B only B chunks
            tally.leaks.append(f"key {who} got {s.get('doc_id')}")


async def one_request(
    http: httpx.AsyncClient, url: str, who: str, rng: random.Random, team_b_docs, tally
) -> None:
    key = KEY_A if who == "A" else KEY_B
    headers = {"authorization": f"Bearer {key}"}
    roll = rng.random()
    question = rng.choice(QUESTIONS)
    msgs = [{"role": "user", "content": question}]
    started = time.perf_counter()
    status = 0
    try:
        if roll < 0.10:  # malformed
            bad = rng.choice(MALFORMED)
            raw = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
            r = await http.post(
                f"{url}/chat/completions",
                content=raw,
                headers={**headers, "content-type": "application/json"},
            )
            status = r.status_code
            if status not in (400, 404, 429):
                tally.unexpected.append(f"malformed -> {status}: {r.text[:120]}")
        elif roll < 0.20:  # embeddings
            r = await http.post(
                f"{url}/embeddings",
                json={"model": "all-MiniLM-L6-v2", "input": [question, "kettle"]},
                headers=headers,
            )
            status = r.status_code
        elif roll < 0.40:  # a stream on the retrieval route; 1 in 20 cancelled
            body = {"model": "kb", "messages": msgs, "max_tokens": 16, "stream": True}
            cancel = rng.random() < 0.05
            async with http.stream(
                "POST", f"{url}/chat/completions", json=body, headers=headers
            ) as r:
                status = r.status_code
                events = 0
                if status != 200:
                    await r.aread()  # the error body, for the tally
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    events += 1
                    data = json.loads(line[6:])
                    if "error" in data:
                        tally.unexpected.append(f"stream error event: {line[:120]}")
                    if "sources" in data:
                        check_sources(who, data, team_b_docs, tally)
                    if cancel and events >= 2:
                        break
        else:
            body: dict = {"model": "kb" if roll < 0.70 else "tiny", "messages": msgs}
            body["max_tokens"] = 16
            if roll >= 0.90:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA},
                }
            r = await http.post(f"{url}/chat/completions", json=body, headers=headers)
            status = r.status_code
            if status == 200:
                check_sources(who, r.json(), team_b_docs, tally)
    except httpx.HTTPError as e:
        tally.unexpected.append(f"{type(e).__name__}: {e}")
        status = -1
    tally.status[(who, status)] += 1
    if status == 503:
        try:
            tally.shed[r.json()["error"]["message"][:60]] += 1
        except Exception:
            tally.shed["(no JSON body)"] += 1
    if status == 200:
        tally.latency[who].append(time.perf_counter() - started)


async def run_mix(
    url: str, seconds: float, concurrency: int, keys: str, team_b_docs: set[str], seed: int
) -> Tally:
    """Closed loop: ``concurrency`` clients until ``seconds`` have passed (bounded)."""
    tally = Tally()
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(timeout=120) as http:
            while time.monotonic() < end:
                who = keys[i % len(keys)]
                await one_request(http, url, who, rng, team_b_docs, tally)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return tally


async def run_plain(url: str, clients: int, seconds: float) -> dict:
    """Closed loop of identical short chats from key A; 503/429 wait their Retry-After
    (at most 1 s) before the client's next request."""
    latencies: list[float] = []
    status: Counter[int] = Counter()
    end = time.monotonic() + seconds
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": 32,
        "ignore_eos": True,
    }

    async def client() -> None:
        async with httpx.AsyncClient(
            timeout=120, headers={"authorization": f"Bearer {KEY_A}"}
        ) as http:
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    r = await http.post(f"{url}/chat/completions", json=body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                status[code] += 1
                if code == 200:
                    latencies.append(time.perf_counter() - t)
                elif code in (429, 503):
                    await asyncio.sleep(min(1.0, float(r.headers.get("retry-after", 1))))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    total = sum(status.values())
    shed = status[503] + status[429]
    return {
        "clients": clients,
        "requests": total,
        "admitted_per_s": status[200] / wall,
        "shed_share": shed / total if total else 0.0,
        "status": {str(k): v for k, v in sorted(status.items())},
        "admitted_p50_s": pct(latencies, 50),
        "admitted_p95_s": pct(latencies, 95),
    }


def replica_rss() -> dict[str, float]:
    """RSS (GiB) of the ingress and engine replica processes (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:loraplex:" not in title:
            continue
        label = "ingress" if "LoraplexIngress" in title else "engine" if "LLM" in title else ""
        if label and p.info["memory_info"] is not None:
            out[label] = round(out.get(label, 0.0) + p.info["memory_info"].rss / 2**30, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--solo-minutes", type=float, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--b-per-minute", type=int, default=120, help="Key B's request limit.")
    ap.add_argument("--engine-ongoing", type=int, default=8)
    ap.add_argument("--overload-seconds", type=float, default=90)
    ap.add_argument("--out", type=Path, default=Path("load.json"))
    args = ap.parse_args()

    from helpers import free_port
    from ray import serve
    from retrieval import write_corpus

    from loraplex.config import load_settings
    from loraplex.models.resolve import resolve_base_model
    from loraplex.retrieval.retriever import Retriever
    from loraplex.serving.builder import start
    from loraplex.serving.config import ServingConfig
    from loraplex.serving.keys import hash_key

    settings = load_settings(overrides=[f"home={args.home}"])
    model_dir, _ = resolve_base_model("embedded", settings)
    tmp = Path(tempfile.mkdtemp())
    files, _ = write_corpus(300, tmp / "team-a")
    team_b = tmp / "team-b"
    team_b.mkdir()
    team_b_docs = set()
    for i in range(40):
        (team_b / f"b-note-{i}.md").write_text(
            f"# Team B note {i}\n\n{MARKER_B} {i}: the price of the Urven E{i}00 is "
            f"{100 + i} dollars for team B.\n"
        )
        team_b_docs.add(f"b-note-{i}")
    with Retriever(settings) as r:
        r.ingest(files, "load_kb", tenant="team-a")
        r.ingest([team_b], "load_kb", tenant="team-b")

    ongoing = args.engine_ongoing
    cfg = ServingConfig.model_validate(
        {
            "models": [
                tiny_model_spec(
                    model_dir,
                    scaling={
                        "max_ongoing_requests": ongoing,
                        "max_queued_requests": max(1, ongoing // 4),
                    },
                )
            ],
            "routes": [
                {
                    "name": "kb",
                    "base": "tiny",
                    "retrieval": {"collection": "load_kb", "top_k": 3},
                }
            ],
            "auth": {
                "keys": [
                    {
                        "name": "team-a",
                        "sha256": hash_key(KEY_A),
                        "collections": ["load_kb"],
                        "tenant": "team-a",
                        "limits": {"max_concurrent": 256},
                    },
                    {
                        "name": "team-b",
                        "sha256": hash_key(KEY_B),
                        "collections": ["load_kb"],
                        "tenant": "team-b",
                        "limits": {"requests_per_minute": args.b_per_minute},
                    },
                ]
            },
        }
    )
    url = start(cfg, settings, port=free_port())
    results: dict = {"concurrency": args.concurrency, "engine_ongoing": ongoing}
    try:
        print("warm-up (30 s)")
        asyncio.run(run_mix(url, 30, args.concurrency, "A", team_b_docs, seed=0))
        results["rss_after_warmup_gib"] = replica_rss()
        print(f"key A alone ({args.solo_minutes} min)")
        solo = asyncio.run(
            run_mix(url, args.solo_minutes * 60, args.concurrency, "A", team_b_docs, 1)
        )
        results["solo"] = solo.summary()
        print(f"mixed load, keys A and B ({args.minutes} min)")
        mixed = asyncio.run(run_mix(url, args.minutes * 60, args.concurrency, "AB", team_b_docs, 2))
        results["mixed"] = mixed.summary()
        results["rss_after_run_gib"] = replica_rss()
        print(f"capacity: {ongoing} clients ({args.overload_seconds:.0f} s)")
        results["at_capacity"] = asyncio.run(run_plain(url, ongoing, args.overload_seconds))
        print(f"overload: {4 * ongoing} clients ({args.overload_seconds:.0f} s)")
        results["overload_4x"] = asyncio.run(run_plain(url, 4 * ongoing, args.overload_seconds))
    finally:
        serve.shutdown()
        args.out.write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_summary(r: dict) -> None:
    m, s = r["mixed"], r["solo"]
    a, o = r["at_capacity"], r["overload_4x"]
    print(f"\nmixed: {m['requests']} requests, by key and status: {m['status_by_key']}")
    print(f"5xx other than 503 sheds: {m['server_errors_not_shed']}; 429 by key: {m['429_by_key']}")
    print(f"cross-tenant chunks: {m['cross_tenant_chunks']}; unexpected: {m['unexpected']}")
    print(f"RSS after warm-up {r['rss_after_warmup_gib']} -> after run {r['rss_after_run_gib']}")
    print(f"key A p95: alone {s['p95_s']['A']:.3f} s, with B {m['p95_s']['A']:.3f} s")
    print(
        f"capacity ({a['clients']} clients): {a['admitted_per_s']:.1f} req/s, "
        f"p95 {a['admitted_p95_s']:.3f} s; 4x ({o['clients']}): shed {o['shed_share']:.0%}, "
        f"admitted p95 {o['admitted_p95_s']:.3f} s, {o['status']}"
    )


if __name__ == "__main__":
    main()
