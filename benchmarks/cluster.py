"""Benchmark of loraplex on a multi-node Ray cluster whose worker nodes die (issue 18).

The cluster is ``tests/cluster.py``'s: a Ray head and worker nodes on 127.0.0.1, each
worker node in its own mount namespace with an empty tmpfs over the driver's home and
``--home`` (root only), token authentication on. Services by URI: an MLflow server with
proxied artifacts (the tiny base model registered there as ``tiny-cluster``), and an
S3-compatible server (moto) for ``ray.storage_path``. Two phases, each bounded:

1. **train**: ``ray job submit -- python jobs/finetune.py`` with 2 ZeRO-3 workers
   (SPREAD: one per worker node), ``--steps`` steps, a checkpoint every ``--save-steps``;
   at step ``--kill-at`` the node of rank 1 is killed (SIGKILL to its process group)
   and a replacement node joins. Figures: seconds from the kill to the first new step,
   steps done twice, the largest gap in the loss history, wall time, final status.
2. **serve**: the application deployed with ``serve deploy`` (as a RayService applies
   ``serveConfigV2``), 2 LLM server replicas on the two worker nodes, ``--clients``
   clients in a loop; the ingress on the head. (a) a model node is killed: failed
   requests after the kill, and the time until a second replica runs again once a node
   joins; (b) ``serve deploy`` of a changed config (one more route: every deployment of
   the application gets a new version and rolls) under the same load: failed requests,
   the time until the new route answers and until ``serve status`` says RUNNING with
   every deployment HEALTHY, and how many of the old replicas were replaced.

Usage: .venv/bin/python benchmarks/cluster.py --home HOME   (HOME: `loraplex bootstrap`
and `loraplex world generate --seed 0` done) [--phase train serve --out cluster.json]
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from cluster import HEAD_INGRESS, RAY, LocalCluster, can_run
from helpers import (
    REPO,
    free_port,
    start_mlflow_server,
    start_s3_server,
    stop,
    tiny_model_spec,
)

BASE = "tiny-cluster"
MSGS = [{"role": "user", "content": "What is the warranty of the Urven E100?"}]


def _job(c: LocalCluster, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [RAY, "job", *args[:1], f"--address={c.dashboard}", *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=c.client_env(),
    )
    return proc.stdout + proc.stderr


def resume_point(logged: list[tuple[int, int]]) -> tuple[int | None, float | None]:
    """From (step, timestamp ms) in logging order: the first step logged again after a
    restart (a step at or below the highest one so far) and the seconds between it and
    the step logged just before it (the surviving rank may go on logging for a few
    seconds after a node dies, so the kill's own time says less than this)."""
    highest = -1
    for (prev, before), (step, at) in itertools.pairwise(sorted(logged, key=lambda x: x[1])):
        highest = max(highest, prev)
        if step <= highest:
            return step, round((at - before) / 1000, 1)
    return None, None


def train(c: LocalCluster, ctx: dict, args: argparse.Namespace) -> dict:
    import mlflow

    from loraplex.training.jobstore import JobStore

    storage = f"s3://loraplex/bench-{int(time.time())}"
    store = JobStore(storage, endpoint=ctx["s3"])
    data = args.home / "worlds" / "seed-0" / "datasets" / "json_answer"
    cfg = {
        "name": "spread",
        "base_model": f"models:/{BASE}@current",
        "data": {
            "train": str(data / "train.openai.jsonl"),
            "eval": str(data / "test.openai.jsonl"),
            "format": "openai",
            "max_length": 256,
        },
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "deepspeed": {"stage": 3},
        "ray": {"num_workers": 2, "max_failures": 2, "storage_path": storage},
        "train": {
            "max_steps": args.steps,
            "save_steps": args.save_steps,
            "per_device_batch_size": 2,
            "learning_rate": 0.001,
            "logging_steps": 1,
            "eval_steps": 10_000,
        },
        "mlflow": {"registered_model": "spread"},
    }
    path = ctx["root"] / "spread.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env_vars = {
        "LORAPLEX_HOME": str(ctx["driver_home"]),
        "LORAPLEX_MLFLOW__TRACKING_URI": ctx["mlflow"],
        "AWS_ENDPOINT_URL": ctx["s3"],
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    started = time.monotonic()
    out = _job(
        c,
        "submit",
        "--no-wait",
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        sys.executable,
        str(REPO / "jobs" / "finetune.py"),
        str(path),
    )
    job_id = next(w.strip("'\"") for w in out.split() if w.strip("'\"").startswith("raysubmit_"))
    client = mlflow.MlflowClient(ctx["mlflow"])

    def history(run_id: str) -> list[tuple[int, int]]:
        """(step, timestamp ms) of every loss logged."""
        return [(m.step, m.timestamp) for m in client.get_metric_history(run_id, "loss")]

    def runs() -> list[dict]:
        return json.loads(store.read_text("spread/job.json") or '{"runs": []}')["runs"]

    run_id, killed_at, victim, seen_step = None, None, None, None
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline and killed_at is None:
        if got := runs():
            run_id = got[-1].get("mlflow_run_id")
        steps = [s for s, _ in history(run_id)] if run_id else []
        if steps and max(steps) >= args.kill_at:
            workers = f"spread/{got[-1]['run_name']}/workers"
            victim = c.node_of(store.read_text(f"{workers}/rank-1.node") or "")
            killed_at, seen_step = time.time(), max(steps)
            c.kill_node(victim)
            print(f"[train] step {max(steps)}: killed node {victim}", flush=True)
            c.add_node("w3")
        status = _job(c, "status", job_id).upper()
        if "FAILED" in status or "SUCCEEDED" in status:
            break
        time.sleep(1)
    while time.monotonic() < deadline:
        status = _job(c, "status", job_id).upper()
        if any(w in status for w in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    wall = time.monotonic() - started
    logged = history(run_id) if run_id else []
    steps = sorted({s for s, _ in logged})
    resumed_at, pause_s = resume_point(logged)
    twice = sorted(s for s, n in Counter(s for s, _ in logged).items() if n > 1)
    result = {
        "status": "SUCCEEDED" if "SUCCEEDED" in status else status.strip()[-200:],
        "killed_node": victim,
        "steps": args.steps,
        "last_step": steps[-1] if steps else None,
        "killed_when_the_benchmark_saw_step": seen_step,
        "resumed_at_step": resumed_at,
        "last_step_before_to_first_after_resume_s": pause_s,
        "steps_done_twice": len(twice),
        "largest_gap": max((b - a for a, b in itertools.pairwise(steps)), default=None),
        "wall_s": round(wall, 1),
        "save_steps": args.save_steps,
    }
    print(f"[train] {result}", flush=True)
    return result


def serve_config(ctx: dict, port: int, routes: list[dict]) -> Path:
    serving = {
        "name": "cluster",
        "models": [
            tiny_model_spec(
                f"models:/{BASE}@current",
                accelerator="cpu",
                num_cpus=1,
                scaling={"num_replicas": 2},
            )
        ],
        "routes": routes,
        "retriever": None,
        "auth": {"allow_anonymous": True},
        "ingress": HEAD_INGRESS,
    }
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "cluster",
                "route_prefix": "/",
                "import_path": "loraplex.serving.builder:build_app",
                "runtime_env": {
                    "env_vars": {
                        "LORAPLEX_HOME": str(ctx["driver_home"]),
                        "LORAPLEX_MLFLOW__TRACKING_URI": ctx["mlflow"],
                    }
                },
                "args": {"config": serving},
            }
        ],
    }
    path = ctx["root"] / f"serve-{len(routes)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(c: LocalCluster, ctx: dict, args: argparse.Namespace) -> dict:
    from openai import OpenAI

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    route = {"name": "plain", "base": "tiny"}
    c.serve("deploy", str(serve_config(ctx, port, [route]))).check_returncode()
    openai = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            openai.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4)
            if len(sorted(c.replicas().values())) == 2:
                break
        except Exception:
            pass
        time.sleep(5)
    nodes = sorted(c.replicas().values())
    print(f"[serve] replicas on {nodes}", flush=True)
    results: list[tuple[float, bool, str]] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            t = time.monotonic()
            try:
                openai.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8)
                results.append((t, True, ""))
            except Exception as e:
                results.append((t, False, type(e).__name__))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(20)
    victim = next(n for n in nodes if n != "head")  # the ingress is on the head
    killed = time.monotonic()
    c.kill_node(victim)
    print(f"[serve] killed node {victim}", flush=True)
    time.sleep(args.after_kill_s)
    joined = time.monotonic()
    c.add_node("w4")
    while time.monotonic() < joined + 600 and len(sorted(c.replicas().values())) < 2:
        time.sleep(3)
    back_s = time.monotonic() - joined
    time.sleep(10)
    old_replicas = {*c.replicas(), *c.replicas("LoraplexIngress")}
    update_at = time.monotonic()
    routes = [route, {"name": "second", "base": "tiny", "system_prompt": "Answer briefly."}]
    c.serve("deploy", str(serve_config(ctx, port, routes))).check_returncode()
    new_route_s = None
    while time.monotonic() < update_at + 900:
        try:
            if "second" in {m.id for m in openai.models.list().data}:
                new_route_s = time.monotonic() - update_at
                break
        except Exception:
            pass
        time.sleep(2)
    time.sleep(10)
    while time.monotonic() < update_at + 1200 and not c.app_running("cluster"):
        time.sleep(3)  # the rolling update goes on under load
    update_s = time.monotonic() - update_at
    replaced = len(old_replicas - {*c.replicas(), *c.replicas("LoraplexIngress")})
    time.sleep(args.after_update_s)
    done.set()
    for t in threads:
        t.join(timeout=300)
    before = [r for r in results if r[0] < killed]
    node_death = [r for r in results if killed <= r[0] < update_at]
    update = [r for r in results if r[0] >= update_at]
    result = {
        "clients": args.clients,
        "requests_before_kill": len(before),
        "failed_before_kill": sum(not ok for _, ok, _ in before),
        "requests_after_kill": len(node_death),
        "failed_after_kill": sum(not ok for _, ok, _ in node_death),
        "errors_after_kill": dict(Counter(e for _, ok, e in node_death if not ok)),
        "replica_back_after_join_s": round(back_s, 1),
        "requests_during_update": len(update),
        "failed_during_update": sum(not ok for _, ok, _ in update),
        "errors_during_update": dict(Counter(e for _, ok, e in update if not ok)),
        "new_route_after_deploy_s": round(new_route_s, 1) if new_route_s else None,
        "update_running_after_s": round(update_s, 1),
        "replicas_replaced_by_update": f"{replaced} of {len(old_replicas)}",
        "replicas_after": sorted(c.replicas().values()),
    }
    print(f"[serve] {result}", flush=True)
    c.serve("shutdown", "-y")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--phase", nargs="+", choices=["train", "serve"], default=["train", "serve"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=60)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--after-kill-s", type=float, default=60)
    p.add_argument("--after-update-s", type=float, default=20)
    p.add_argument("--out", type=Path, default=Path("cluster.json"))
    args = p.parse_args()
    if why := can_run():
        sys.exit(f"cluster.py: {why}")
    # the local S3 server accepts any credentials; every node inherits these, as pods
    # would have theirs
    for key, value in {
        "AWS_ACCESS_KEY_ID": "loraplex-bench",
        "AWS_SECRET_ACCESS_KEY": "loraplex-bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(key, value)
    import mlflow

    from loraplex.models.registry import register_base_model

    model = args.home / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        sys.exit(f"cluster.py: no tiny model in {args.home} (run `loraplex bootstrap` first)")
    root = Path(tempfile.mkdtemp(prefix="lpx-cluster-bench-"))
    results: dict = {}
    with contextlib.ExitStack() as started:  # everything started here is stopped by pid
        server, url = start_mlflow_server(root / "mlflow", free_port(), proxied=True)
        started.callback(stop, server)
        s3, s3_url = start_s3_server(free_port(), "loraplex")
        started.callback(stop, s3)
        client = mlflow.MlflowClient(url)
        experiment = client.create_experiment("base-models")
        register_base_model(client, experiment, model, BASE, {"loraplex.source": "bench"})
        driver_home = root / "driver-home"
        driver_home.mkdir()
        ctx = {"root": root, "mlflow": url, "s3": s3_url, "driver_home": driver_home}
        env = {"AWS_ENDPOINT_URL": s3_url}
        local = LocalCluster(private=[driver_home, args.home], head_cpus=1, node_cpus=2, env=env)
        started.callback(local.stop)
        local.start()
        local.add_node("w1")
        local.add_node("w2")
        if "train" in args.phase:
            results["train"] = train(local, ctx, args)
        if "serve" in args.phase:
            results["serve"] = serve(local, ctx, args)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| figure | value |\n|---|---|")
    for phase, figures in results.items():
        for k, v in figures.items():
            print(f"| {phase}: {k} | {v} |")


if __name__ == "__main__":
    main()
