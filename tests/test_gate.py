"""The promotion gate's rules (the serving tests run a whole gated promotion against the
real application; here each rule, the noise case and bad gate files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import clean_env, one_line_error, run_cli

from loraplex.errors import LoraplexError
from loraplex.evaluation.gate import MetricRule, judge, load_gate


def summary(accuracy: float, n: int = 40, p95: float = 1.0, compliance: float = 1.0) -> dict:
    right = round(accuracy * n)
    return {
        "accuracy": accuracy,
        "compliance": compliance,
        "latency_p95_s": p95,
        "by_question": {
            "accuracy": {f"q{i}": float(i < right) for i in range(n)},
            "compliance": {f"q{i}": compliance for i in range(n)},
        },
    }


def rules(**kw) -> dict[str, MetricRule]:
    return {k: MetricRule.model_validate(v) for k, v in kw.items()}


def test_floors_ceilings_drops_and_ratios() -> None:
    checks = judge(
        rules(
            accuracy={"min": 0.8, "max_drop": 0.01},
            compliance={"min": 0.98},
            latency_p95_s={"max_ratio": 1.2, "max": 5},
        ),
        summary(0.85, p95=1.3),
        summary(0.85, p95=1.0),
        "refuse",
    )
    verdicts = {(c.metric, c.rule): c.passed for c in checks}
    assert verdicts == {
        ("accuracy", ">= 0.8"): True,
        ("accuracy", ">= incumbent - 0.01"): True,
        ("compliance", ">= 0.98"): True,
        ("latency_p95_s", "<= 5"): True,
        ("latency_p95_s", "<= 1.2 x incumbent"): False,  # 1.3 s against 1.0 s
    }


def test_a_drop_inside_the_noise_follows_the_gate_file() -> None:
    r = rules(accuracy={"max_drop": 0.01})
    # 2 answers of 40 worse: fails the rule, but the paired interval reaches -0.01
    for rule, expected in (("pass", True), ("refuse", False)):
        (check,) = judge(r, summary(0.80), summary(0.85), rule)
        assert check.passed is expected and f"within noise: {rule}" in check.note
    # 20 of 40 worse: outside the noise, refused whatever the rule
    (check,) = judge(r, summary(0.35), summary(0.85), "pass")
    assert not check.passed and "within noise" not in check.note
    assert "95% interval [-" in check.note


def test_a_first_promotion_is_judged_on_the_absolute_rules_only() -> None:
    checks = judge(rules(accuracy={"min": 0.5, "max_drop": 0.0}), summary(0.6), None, "pass")
    assert [(c.rule, c.passed) for c in checks] == [(">= 0.5", True)]
    (missing,) = judge(rules(label_accuracy={"min": 0.5}), summary(0.6), None, "pass")
    assert not missing.passed and missing.note == "not measured"


def test_bad_gate_files_are_refused_before_anything_runs(tmp_path: Path) -> None:
    env = clean_env(LORAPLEX_HOME=str(tmp_path / "home"))
    cases = [
        ("model: r\nquestions: q.jsonl\nmetrics: {accurcy: {min: 0.5}}\n", "metrics.accurcy"),
        ("model: r\nquestions: q.jsonl\nmetrics: {accuracy: {}}\n", "a rule needs min"),
        ("model: r\nquestions: q.jsonl\nmetrics: {}\n", "metrics"),
        ("model: r\nmetrics: {accuracy: {min: 1}}\n", "questions"),
        ("model: r\nquestions: q.jsonl\nwithin_noise: maybe\nmetrics: {f1: {min: 0}}\n", "noise"),
    ]
    for i, (text, reason) in enumerate(cases):
        path = tmp_path / f"gate{i}.yaml"
        path.write_text(text)
        with pytest.raises(LoraplexError, match=reason) as e:
            load_gate(path, tmp_path)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    proc = run_cli("adapters", "promote", "a", "2", "--gate", str(tmp_path / "gate0.yaml"), env=env)
    assert proc.returncode == 2 and "metrics.accurcy" in one_line_error(proc)
    proc = run_cli("adapters", "promote", "a", "2", "--gate", str(tmp_path / "no.yaml"), env=env)
    assert proc.returncode == 2 and "does not exist" in one_line_error(proc)
    # train, gate and promote as one job: a bad gate file stops it before training
    config = "jobs/configs/json_answer.yaml"
    proc = run_cli("train", config, "--gate", str(tmp_path / "gate0.yaml"), env=env)
    assert proc.returncode == 2 and "metrics.accurcy" in one_line_error(proc)
    assert not (tmp_path / "home" / "jobs").exists()


@pytest.mark.vllm
def test_a_gate_without_a_running_endpoint_starts_one_for_itself(
    tiny_base, settings, tmp_path: Path
) -> None:
    import json

    import httpx
    import yaml
    from helpers import make_adapter
    from mlflow import MlflowClient

    from loraplex import tracking
    from loraplex.evaluation.gate import GateConfig, run_gate, temporary_endpoint
    from loraplex.models.adapters import register_external

    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    experiment = tracking.setup(settings)
    base = tiny_base.model_dir
    for seed in (1, 2):
        folder = make_adapter(base, tmp_path / f"g{seed}", seed)
        register_external(client, folder, "gated-local", base, str(base), None, experiment)
    client.set_registered_model_alias("gated-local", "production", "1")
    serving = tmp_path / "serving.yaml"
    model = {"id": "tiny", "source": str(base), "max_model_len": 512, "dtype": "float32"}
    serving.write_text(
        yaml.safe_dump(
            {
                "name": "gatecheck",
                "models": [{**model, "kv_cache_gib": 1}],
                "adapters": [{"name": "g", "base": "tiny", "registry": "gated-local@production"}],
                "retriever": None,
                "auth": {"allow_anonymous": True},
            }
        )
    )
    gate = GateConfig.model_validate(
        {
            "model": "tiny:g",
            "questions": str(tiny_base.world_dir / "queries.jsonl"),
            "split": "test",
            "limit": 4,
            "max_tokens": 4,
            "metrics": {"accuracy": {"max_drop": 1.0}, "latency_p95_s": {"max": 60}},
        }
    )
    out = tmp_path / "report"
    with temporary_endpoint(settings, serving) as url:
        assert url.startswith("http://127.0.0.1:")
        result = run_gate(
            settings, gate, "gated-local", "2", "production", "1", url, None, out, progress=False
        )
        # the same endpoint, a rule no CPU answer meets: the gate refuses, naming the rule
        strict = GateConfig.model_validate(
            {
                **gate.model_dump(),
                "metrics": {"accuracy": {"max_drop": 1.0}, "latency_p95_s": {"max": 0.001}},
            }
        )
        refused = run_gate(
            settings,
            strict,
            "gated-local",
            "2",
            "production",
            "1",
            url,
            None,
            tmp_path / "strict",
            progress=False,
        )
    assert not refused.passed
    assert [c.metric for c in refused.failing()] == ["latency_p95_s"]
    assert result.passed and result.mlflow_run_id
    answers = json.loads((out / "results.json").read_text())["answers"]
    assert {a["model"] for a in answers} == {"tiny:gated-local/1", "tiny:gated-local/2"}
    with pytest.raises(httpx.ConnectError):  # stopped with the gate
        httpx.get(f"{url}/models", timeout=5)
