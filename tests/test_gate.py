"""The promotion gate's rules (the serving tests run a whole gated promotion against the
real application; here each rule, the noise case and bad gate files)."""

from __future__ import annotations

from pathlib import Path

from helpers import clean_env, one_line_error, run_cli

from loraplex.evaluation.gate import MetricRule, judge


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
        proc = run_cli("adapters", "promote", "a", "2", "--gate", str(path), env=env)
        assert proc.returncode == 2, (text, proc.stderr)
        assert reason in one_line_error(proc), (text, proc.stderr)
    proc = run_cli("adapters", "promote", "a", "2", "--gate", str(tmp_path / "no.yaml"), env=env)
    assert proc.returncode == 2 and "does not exist" in one_line_error(proc)
    # train, gate and promote as one job: a bad gate file stops it before training
    config = "jobs/configs/json_answer.yaml"
    proc = run_cli("train", config, "--gate", str(tmp_path / "gate0.yaml"), env=env)
    assert proc.returncode == 2 and "metrics.accurcy" in one_line_error(proc)
    assert not (tmp_path / "home" / "jobs").exists()
