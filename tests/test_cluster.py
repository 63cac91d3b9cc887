"""loraplex on a multi-node Ray cluster whose worker nodes have private disks.

A Ray head and two worker nodes on 127.0.0.1 (``tests/cluster.py``), each worker node in
its own mount namespace with an empty tmpfs over the driver's ``LORAPLEX_HOME`` and the
session's home (where the tiny base model's folder is): a worker reaches the base model
only through the MLflow server (artifacts proxied by the server), and the job's state
and checkpoints only through S3-compatible storage (a local S3 server). Token
authentication stays on, as Ray ships it. The session's in-process Ray is shut down
meanwhile (two Rays do not come up side by side on this machine) and started again
afterwards.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from cluster import HEAD_INGRESS, RAY, LocalCluster, can_run
from helpers import REPO, free_port, start_mlflow_server, stop

# Skipped where private nodes cannot run (no root, no unshare), except in CI (`CI` set, as
# `.ci/run` sets it): there a cluster test that cannot run fails, naming why.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray_train,
    pytest.mark.vllm,
    pytest.mark.skipif(bool(can_run()) and not os.environ.get("CI"), reason=str(can_run())),
]

BASE = "tiny-cluster"


@pytest.fixture(scope="module")
def cluster(tiny_base, settings, tmp_path_factory, s3) -> Iterator[dict]:
    """MLflow server (proxied artifacts) holding the tiny base model as a registered
    version, and a head plus two private worker nodes."""
    if why := can_run():
        pytest.fail(f"CI is set, so the cluster tests must run, but {why}")
    import ray

    from loraplex.models.registry import register_base_model
    from loraplex.ray_runtime import init_ray

    root = tmp_path_factory.mktemp("cluster")
    server, url = start_mlflow_server(root / "mlflow", free_port(), proxied=True)
    client = mlflow.MlflowClient(url)
    experiment = client.create_experiment("base-models")
    register_base_model(client, experiment, tiny_base.model_dir, BASE, {"loraplex.source": "test"})
    home = root / "driver-home"  # the job's LORAPLEX_HOME: private on worker nodes
    home.mkdir()
    ray.shutdown()
    local = LocalCluster(private=[home, settings.home], head_cpus=1, node_cpus=2)
    try:
        local.start()
        local.add_node("w1")
        local.add_node("w2")
        yield {"cluster": local, "mlflow": url, "home": home, "client": client, "s3": s3}
    finally:
        local.stop()
        stop(server)
        init_ray(settings)  # the session's Ray, for the tests after this one


def _job_config(folder: Path, session_home: Path, storage: str, **train) -> Path:
    data = session_home / "worlds" / "seed-0" / "datasets" / "json_answer"
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
        "ray": {
            "num_workers": 2,
            "cpus_per_worker": 1,
            "max_failures": 2,
            "storage_path": storage,
        },
        "train": {
            "per_device_batch_size": 2,
            "learning_rate": 0.001,
            "logging_steps": 1,
            "eval_steps": 100,
            **train,
        },
        "mlflow": {"registered_model": "spread"},
    }
    path = folder / "spread.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job(c: LocalCluster, command: str, *args: str, timeout: float = 120) -> str:
    """``ray job COMMAND --address DASHBOARD ARGS``: its output (Ray logs to stderr)."""
    proc = subprocess.run(
        [RAY, "job", command, f"--address={c.dashboard}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=c.client_env(),
    )
    return proc.stdout + proc.stderr


def _nodes_of_ranks(c: LocalCluster, store, workers: str) -> dict[str, str]:
    return {
        f.removesuffix(".node"): c.node_of(store.read_text(f"{workers}/{f}"))
        for f in store.files(workers, ".node")
    }


def test_training_spreads_over_private_nodes_and_survives_a_node_death(
    cluster, settings, tiny_base, tmp_path
) -> None:
    """`ray job submit --working-dir REPO -- python jobs/finetune.py CONFIG` (the README's
    command; the working dir travels through the GCS to every node): two ZeRO-3 workers
    on two private worker nodes, the base model downloaded on each from the registry, job
    state and checkpoints on S3; one worker node dies mid-run and a replacement joins; the
    job resumes from its last checkpoint (every rank's shard) and finishes in the same
    MLflow run, registered on the MLflow server."""
    from loraplex.training.jobstore import JobStore

    c: LocalCluster = cluster["cluster"]
    storage = f"s3://loraplex/{tmp_path.name}"
    store = JobStore(storage, endpoint=cluster["s3"])
    config = _job_config(tmp_path, settings.home, storage, max_steps=120, save_steps=10)
    env_vars = {
        "LORAPLEX_HOME": str(cluster["home"]),
        "LORAPLEX_MLFLOW__TRACKING_URI": cluster["mlflow"],
        "AWS_ENDPOINT_URL": cluster["s3"],
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    submitted = _job(
        c,
        "submit",
        "--no-wait",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        sys.executable,
        "jobs/finetune.py",
        str(config),
    )
    job_id = next(
        w.strip("'\"")
        for line in submitted.splitlines()
        for w in line.split()
        if w.strip("'\"").startswith("raysubmit_")
    )
    client: mlflow.MlflowClient = cluster["client"]

    def steps(run_id: str) -> list[int]:
        return sorted({m.step for m in client.get_metric_history(run_id, "loss")})

    def status() -> str:
        return _job(c, "status", job_id).upper()

    def runs() -> list[dict]:
        return json.loads(store.read_text("spread/job.json") or '{"runs": []}')["runs"]

    # phase 1: both workers up, on two different worker nodes, past a checkpoint (the
    # tiny model takes ~0.3 s a step: the node dies well before step 120)
    first: dict[str, str] = {}
    run_id, workers = None, ""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if got_runs := runs():
            run_id = got_runs[-1].get("mlflow_run_id")
            workers = f"spread/{got_runs[-1]['run_name']}/workers"
        ranks = store.files(workers, ".node") if workers else []
        if run_id and len(ranks) == 2 and (got := steps(run_id)) and max(got) >= 20:
            first = _nodes_of_ranks(c, store, workers)
            break
        assert "FAILED" not in (s := status()) and "SUCCEEDED" not in s, s
        time.sleep(2)
    assert first, f"never at step 20 on two workers: {status()}{_job(c, 'logs', job_id)}"
    assert sorted(first.values()) == ["w1", "w2"], first  # SPREAD over the two nodes

    # phase 2: the node of rank 1 dies; a replacement joins
    c.kill_node(first["rank-1"])
    c.add_node("w3")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not any(
        word in (s := status()) for word in ("SUCCEEDED", "FAILED", "STOPPED")
    ):
        time.sleep(3)
    logs = _job(c, "logs", job_id)
    assert "SUCCEEDED" in s, s + logs[-4000:]
    assert "registered spread version 1" in logs
    assert "resuming from the checkpoint of step" in logs

    got = steps(run_id)
    assert got[-1] == 120, got
    assert max(b - a for a, b in itertools.pairwise(got)) <= 10, got  # ≤ save_steps lost
    # it went on from a checkpoint, not from the start: only steps after the last
    # checkpoint before the kill were logged twice (a restart from step 0 would repeat
    # every step up to the kill, 20 or more)
    logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    repeated = sorted(s for s, n in collections.Counter(logged).items() if n > 1)
    assert len(repeated) <= 2 * 10 and got[0] not in repeated, (repeated, logged)
    assert [r["status"] for r in runs()] == ["FINISHED"]
    after = _nodes_of_ranks(c, store, workers)
    assert first["rank-1"] not in after.values(), after  # nothing runs on the dead node

    # the version is on the MLflow server, its artifacts reachable through it alone
    mv = client.get_model_version_by_alias("spread", "candidate")
    assert mv.run_id == run_id
    assert client.get_run(run_id).data.params["deepspeed.stage"] == "3"
    assert mv.source.startswith("mlflow-artifacts:/"), mv.source  # the server's store
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(tmp_path / "dl"), tracking_uri=cluster["mlflow"]
        )
    )
    # the registered adapter is whole: the tensors an undisturbed LoRA of this config
    # has, gathered from both ranks' ZeRO-3 shards, with their full shapes, trained
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(next(folder.rglob("adapter_model.safetensors"))))
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base.model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    expected = {
        k.replace(".default", ""): tuple(v.shape)
        for k, v in fresh.state_dict().items()
        if "lora_" in k
    }
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # Ray Train's checkpoints and the kept adapter are on S3, as the run's tag says
    assert store.files(f"spread/{runs()[-1]['run_name']}/final-adapter", ".json")
    assert client.get_run(run_id).data.tags["loraplex.storage"] == f"{storage}/spread/spread"


def _serve_config(cluster: dict, tmp_path: Path, port: int, routes: list[dict]) -> Path:
    """A Ray Serve config file, as a RayService's ``serveConfigV2`` holds it: the
    application builder with the serving config inline, the settings by environment."""
    serving = {
        "name": "cluster",
        "models": [
            {
                "id": "tiny",
                "source": f"models:/{BASE}@current",
                "accelerator": "cpu",
                "max_model_len": 512,
                "dtype": "float32",
                "kv_cache_gib": 1,
                "max_adapters_per_replica": 2,
                "max_lora_rank": 8,
                "num_cpus": 1,
                "scaling": {"num_replicas": 2},
            }
        ],
        "adapters": [{"name": "spread", "base": "tiny", "registry": "spread@candidate"}],
        "routes": routes,
        "retriever": None,
        "auth": {"allow_anonymous": True},
        "ingress": HEAD_INGRESS,
    }
    env = {
        "LORAPLEX_HOME": str(cluster["home"]),
        "LORAPLEX_MLFLOW__TRACKING_URI": cluster["mlflow"],
    }
    config = {
        "proxy_location": "HeadOnly",  # the nodes share one address here
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "cluster",
                "route_prefix": "/",
                "import_path": "loraplex.serving.builder:build_app",
                "runtime_env": {"env_vars": env},
                "args": {"config": serving},
            }
        ],
    }
    path = tmp_path / f"serve-{len(routes)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serving_across_private_nodes_routes_around_a_dead_node(cluster, tmp_path) -> None:
    """`serve deploy` of the application (as a RayService applies its serveConfigV2) with
    two LLM server replicas on two private worker nodes: each downloads the base model and
    the adapter from the registry (the nodes cannot see the driver's folders). Under a
    steady load one replica's node dies: only requests running on it may fail, the rest
    keep succeeding. Serve starting the replica again on a node that joins (about 2 min
    here) and a config update under load (about 8) are measured by `benchmarks/cluster.py`
    and kept out of the suite's time."""
    import threading

    from openai import OpenAI

    c: LocalCluster = cluster["cluster"]
    port = free_port()
    plain = {"name": "plain", "base": "tiny"}
    deployed = c.serve("deploy", str(_serve_config(cluster, tmp_path, port, [plain])))
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    base = f"http://127.0.0.1:{port}/v1"
    # the first answers of a fresh CPU engine are slow (two engines share two cores)
    openai = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "What is the warranty of the Urven E100?"}]
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not c.app_running("cluster"):
            time.sleep(5)
        assert c.app_running("cluster"), c.serve("status").stdout
        # each answer names what served it: the base, or the adapter's registry version
        version = cluster["client"].get_model_version_by_alias("spread", "candidate").version
        spread = f"tiny:spread/{version}"
        for model, served_by in (("tiny", "tiny"), ("tiny:spread", spread), ("plain", "tiny")):
            r = openai.chat.completions.create(model=model, messages=msgs, max_tokens=8)
            assert r.model == served_by and r.choices[0].message.content is not None
        nodes = sorted(c.replicas().values())
        assert len(nodes) == 2 and "head" not in nodes, nodes

        # steady load from two clients; the node of one replica dies
        results: list[tuple[float, bool]] = []
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                try:
                    openai.chat.completions.create(model="tiny", messages=msgs, max_tokens=8)
                    results.append((time.monotonic(), True))
                except Exception:
                    results.append((time.monotonic(), False))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(10)
            # the ingress stays where its custom resource put it; a model node dies
            assert set(c.replicas("LoraplexIngress").values()) == {"head"}
            victim = nodes[0]
            killed_at = time.monotonic()
            c.kill_node(victim)
            time.sleep(45)
            before = [ok for at, ok in results if at < killed_at]
            after = [ok for at, ok in results if at >= killed_at]
            assert before and all(before)
            assert after.count(False) <= 2, after  # at most the two requests running on it
            assert after[-5:] == [True] * 5, after  # the surviving replica answers
        finally:
            done.set()
            for t in threads:
                t.join(timeout=300)
        r = openai.chat.completions.create(model="tiny:spread", messages=msgs, max_tokens=8)
        assert r.model == spread and r.choices[0].message.content is not None
    finally:
        c.serve("shutdown", "-y")
