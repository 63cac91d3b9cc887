"""``loraplex demo`` end to end on the session's tiny base model: adapters trained
through Ray Train + DeepSpeed and registered, a held-out world ingested into Milvus Lite,
the serving application started, the four-way evaluation run over HTTP, the report
written; then a second look shows the adapters are reused, not retrained."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import free_port


def test_demo_runs_the_whole_pipeline_and_reuses_what_exists(
    tiny_base, settings, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
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
    assert results["meta"]["adapters_trained_on_seeds"] == {"loraplex-tiny:json-answer": [0]}
    assert (
        "trained on worlds loraplex-tiny:json-answer: seed 0" in (report / "report.md").read_text()
    )

    configs = DEMO_MODELS["tiny"].adapter_configs
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    for name in ("json-answer", "ticket-classify"):
        version = client.get_model_version_by_alias(name, "candidate").version
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
