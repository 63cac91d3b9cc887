"""``loraplex demo`` end to end on the session's tiny base model: adapters trained
through Ray Train + DeepSpeed and registered, a held-out world ingested into Milvus Lite,
the serving application started, the four-way evaluation run over HTTP, the report
written; then a second look shows the adapters are reused, not retrained."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest
from helpers import free_port


@pytest.mark.vllm
@pytest.mark.ray_train
def test_demo_runs_the_whole_pipeline_and_reuses_what_exists(
    tiny_base,
    settings,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    from loraplex.cli.main import cli
    from loraplex.demo import DEMO_MODELS, ensure_adapter, reusable_version
    from loraplex.training.config import load_train_config

    caplog.set_level(logging.INFO, logger="loraplex.demo")
    code = cli.main(
        args=[
            "--home",
            str(settings.home),
            "demo",
            "--model",
            "tiny",
            "--no-serve",
            "--questions",
            "3",
            "--port",
            str(free_port()),
            "--train-set",
            "train.max_steps=2",
            "--train-set",
            "train.epochs=1",
        ],
        prog_name="loraplex",
        standalone_mode=False,
    )
    assert code in (None, 0)
    out = capsys.readouterr().out
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[demo")]
    assert [s.split("]")[0] for s in steps] == [f"[demo {i}/6" for i in range(1, 7)]

    assert "| base+rag |" in out and "| adapter+rag |" in out
    assert "Recommendation: **" in out
    assert "Ticket classification (route `tickets`, adapter ticket-classify): label accuracy" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    report = Path(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("report:")))
    results = json.loads((report / "results.json").read_text())
    assert results["meta"]["collection"] == "eval_seed_7"
    assert results["meta"]["questions"] == 3
    assert set(results["summary"]) == {"base", "base+rag", "adapter", "adapter+rag"}
    assert all(s["errors"] == 0 for s in results["summary"].values()), results["summary"]

    # the report says which worlds the adapters learned from (seed 0, not the questions')
    assert results["meta"]["world_seed"] == 7
    # the report says how many requests were in flight: its latencies are under that load
    assert results["meta"]["concurrency"] == 4
    assert "4 requests at a time" in (report / "report.md").read_text()
    assert results["meta"]["adapters_trained_on_seeds"] == {"loraplex-tiny:json-answer": [0]}
    assert (
        "trained on worlds loraplex-tiny:json-answer: seed 0" in (report / "report.md").read_text()
    )

    configs = DEMO_MODELS["tiny"].adapter_configs
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    from loraplex.models.adapters import alias_log

    for name in ("json-answer", "ticket-classify"):
        version = client.get_model_version_by_alias(name, "candidate").version
        # the shipped configs serve @production: the demo made the first version it
        # (nothing to gate against), and says so in the alias log
        assert client.get_model_version_by_alias(name, "production").version == version
        assert alias_log(client, name, "production")[-1]["why"] == "first release by loraplex demo"
        # a second run finds the adapter trained on this base model and reuses it
        assert ensure_adapter(settings, configs[name], []) == str(version)
    # ... and not one trained on other data (the dataset files changed since)
    cfg = load_train_config(configs["json-answer"], (), settings.home)
    assert reusable_version(settings, cfg) is not None
    train_file = cfg.data.train[0]
    original = train_file.read_bytes()
    try:
        train_file.write_bytes(original + original.splitlines(keepends=True)[0])
        assert reusable_version(settings, cfg) is None
    finally:
        train_file.write_bytes(original)
    assert (settings.home / "worlds" / "seed-7" / "manifest.json").exists()

    # then the README's `serve run serving/serve_config.yaml` on what the demo built, on a
    # Ray of its own with the README machine's 2 logical CPUs (not the session's Ray)
    serve_run_on_two_cpus(settings.home, tmp_path)


def serve_run_on_two_cpus(home: Path, tmp_path: Path) -> None:
    """`serve run` of the shipped Ray Serve config (only its port changed), as a user runs
    it: every deployment schedules on 2 logical CPUs, the routes answer through the
    OpenAI SDK with the registered adapter, and Ctrl-C stops it and everything it started."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import openai
    import psutil
    import yaml
    from helpers import REPO

    port = free_port()
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "RAY_"))},
        "LORAPLEX_HOME": str(home),
        "RAY_ADDRESS": "local",  # a Ray of its own, as on a machine where none runs
        "RAY_OVERRIDE_RESOURCES": '{"CPU": 2}',  # the 2-core machine, wherever this runs
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = tmp_path / "serve-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("serve")), "run", str(path)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: list[psutil.Process] = []
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 480
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{url}/models", timeout=5).status_code == 200
            time.sleep(3)
        tail = log.read_text(errors="replace")[-3000:]
        assert ready, f"serve run never answered (exit {proc.poll()}):\n{tail}"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=180)
        assert {"docs-qa", "docs-json", "tickets"} <= {m.id for m in client.models.list().data}
        r = client.chat.completions.create(
            model="tickets",
            messages=[{"role": "user", "content": "I was charged twice for one order."}],
            max_tokens=4,
        )
        assert r.model.startswith("loraplex-tiny:ticket-classify/"), r.model
        # the Retriever got its share of the 2 CPUs too: it embeds through the endpoint
        emb = client.embeddings.create(model="all-MiniLM-L6-v2", input="kettle")
        assert len(emb.data[0].embedding) == 384

        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0
        _gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        for p in [*tree, *(psutil.Process(proc.pid).children(True) if proc.poll() is None else [])]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
