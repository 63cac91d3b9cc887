"""Evaluation-gated promotion: a candidate version against the version an alias points
at, on the same questions, the same retrieval and the same endpoint.

Owns: :class:`GateConfig` (the gate file: where to ask, which questions, and per metric
an absolute floor or ceiling and a tolerated change against the incumbent), and
:func:`run_gate`: both versions answer every question through the running endpoint
(pinned with the request's ``adapter_version``; :func:`temporary_endpoint` starts the
application here when none runs), each metric with its 95% interval and
each difference with its paired interval; the decision, both versions, every metric and
the report are one MLflow run; the alias moves only when every rule holds. A failing
difference whose interval still reaches the tolerated bound is "within noise" and
follows ``within_noise``. Does not own: the requests and scores (``endpoint``), the
report (``report``) or the alias itself (``models.adapters``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from loraplex import tracking
from loraplex.config import LoraplexConfig, StrictModel, load_model
from loraplex.errors import InputError, LoraplexError
from loraplex.evaluation import endpoint, report
from loraplex.evaluation.intervals import paired_difference
from loraplex.evaluation.run import metric_key
from loraplex.models import tags
from loraplex.serving.builder import check, start
from loraplex.serving.config import load_serving_config

Metric = Literal[endpoint.METRICS]  # type: ignore[valid-type]
log = logging.getLogger(__name__)
# metrics whose per-question values can be paired between the two versions
PAIRED = ("accuracy", "answer_accuracy", "compliance", "faithfulness")


class MetricRule(StrictModel):
    """What the candidate must reach on one metric (any combination)."""

    min: float | None = Field(default=None, description="Absolute floor.")
    max: float | None = Field(default=None, description="Absolute ceiling (latency).")
    max_drop: float | None = Field(
        default=None, ge=0, description="Candidate >= incumbent - max_drop."
    )
    max_ratio: float | None = Field(
        default=None, gt=0, description="Candidate <= max_ratio x incumbent (latency)."
    )

    @model_validator(mode="after")
    def _some(self) -> MetricRule:
        if all(v is None for v in (self.min, self.max, self.max_drop, self.max_ratio)):
            raise ValueError("a rule needs min, max, max_drop or max_ratio")
        return self


class GateConfig(StrictModel):
    """A gate file (YAML): where and on what both versions are measured, and the rules."""

    model: str = Field(
        description="The route or base:adapter the questions go to; its adapter is the one "
        "promoted."
    )
    questions: Path
    split: str | None = None
    limit: int | None = Field(default=None, ge=1)
    task: Literal["chat", "json_answer", "classify_ticket"] | None = Field(
        default=None, description="For base:adapter (a route keeps its own): default chat."
    )
    retrieval: dict[str, Any] | None = Field(
        default=None, description="For base:adapter (a route keeps its own): {collection, ...}."
    )
    max_tokens: int = Field(default=64, ge=1, le=4096)
    concurrency: int = Field(default=4, ge=1, le=64)
    within_noise: Literal["pass", "refuse"] = Field(
        default="pass",
        description="A rule against the incumbent that fails, but whose 95% interval of the "
        "difference still reaches the bound: pass (not shown to be worse) or refuse.",
    )
    metrics: dict[Metric, MetricRule] = Field(min_length=1)


def load_gate(path: Path, home: Path) -> GateConfig:
    """The gate file; ``{home}`` in ``questions`` is LORAPLEX_HOME, a relative path is
    relative to the gate file."""
    if not Path(path).is_file():
        raise InputError(f"gate file {path} does not exist")
    cfg = load_model(GateConfig, path, ())
    questions = Path(str(cfg.questions).replace("{home}", str(home)))
    if not questions.is_absolute():
        questions = Path(path).parent / questions
    return cfg.model_copy(update={"questions": questions})


@dataclass
class Check:
    metric: str
    rule: str
    candidate: float | None
    incumbent: float | None
    passed: bool
    note: str = ""

    def line(self) -> str:
        inc = "–" if self.incumbent is None else f"{self.incumbent:.3f}"
        cand = "–" if self.candidate is None else f"{self.candidate:.3f}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.metric}: {cand} (incumbent {inc}), rule {self.rule}: {verdict}" + (
            f" ({self.note})" if self.note else ""
        )


@dataclass
class GateResult:
    name: str
    alias: str
    candidate: str
    incumbent: str | None
    passed: bool
    checks: list[Check] = field(default_factory=list)
    report: str = ""
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def failing(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def judge(
    rules: dict[str, MetricRule],
    cand: dict[str, Any],
    inc: dict[str, Any] | None,
    within_noise: str,
) -> list[Check]:
    """Each rule against the candidate's summary (and the incumbent's)."""
    checks: list[Check] = []
    for metric, r in rules.items():
        value = cand.get(metric)
        before = inc.get(metric) if inc else None
        if value is None:
            checks.append(Check(metric, "measured", None, before, False, "not measured"))
            continue
        if r.min is not None:
            checks.append(Check(metric, f">= {r.min:g}", value, before, value >= r.min))
        if r.max is not None:
            checks.append(Check(metric, f"<= {r.max:g}", value, before, value <= r.max))
        if before is None:
            continue  # no incumbent (first promotion): only the absolute rules apply
        if r.max_drop is not None:
            ok = value >= before - r.max_drop
            note = ""
            pair = _paired(metric, cand, inc)
            if pair is not None:
                d, (lo, hi) = pair
                note = f"difference {d:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}]"
                if not ok and hi >= -r.max_drop:
                    note += f"; within noise: {within_noise}"
                    ok = within_noise == "pass"
            checks.append(Check(metric, f">= incumbent - {r.max_drop:g}", value, before, ok, note))
        if r.max_ratio is not None:
            ok = value <= r.max_ratio * before
            checks.append(Check(metric, f"<= {r.max_ratio:g} x incumbent", value, before, ok))
    return checks


def _paired(metric: str, cand: dict, inc: dict | None):
    if metric not in PAIRED or not inc:
        return None
    a = (inc.get("by_question") or {}).get(metric) or {}
    b = (cand.get("by_question") or {}).get(metric) or {}
    return paired_difference(a, b)


@contextmanager
def temporary_endpoint(
    settings: LoraplexConfig, serving: Path, overrides: tuple[str, ...] = ()
) -> Iterator[str]:
    """When no endpoint is running: the serving config's application, started here on a
    free loopback port for the gate, stopped after it. Yields the OpenAI base URL."""
    import socket

    from ray import serve

    cfg = load_serving_config(serving, overrides)
    checked = check(cfg, settings)  # refused before anything starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log.info("starting %s on 127.0.0.1:%d for the gate (1-2 minutes on CPU)", serving, port)
    try:
        yield start(cfg, settings, checked, host="127.0.0.1", port=port)
    finally:
        serve.shutdown()


def run_gate(
    settings: LoraplexConfig,
    gate: GateConfig,
    name: str,
    candidate: str,
    alias: str,
    incumbent: str | None,
    url: str,
    api_key: str | None,
    out: Path | None = None,
    progress: bool = True,
) -> GateResult:
    """Measure both versions through the endpoint and judge the candidate."""
    from tqdm import tqdm

    questions = endpoint.load_questions(gate.questions, gate.split, gate.limit)
    ep = endpoint.Endpoint(url, api_key)
    cards = {m["id"]: m for m in ep.models()}
    card = cards.get(gate.model)
    meta = (card or {}).get("metadata") or {}
    if card is None:
        raise InputError(f"gate: {url} serves no {gate.model!r} to this key")
    if meta.get("kind") == "route":
        registry = (
            (cards.get(f"{card.get('parent')}:{meta.get('adapter')}") or {})
            .get("metadata", {})
            .get("registry")
        )
        task, retrieval = meta.get("task"), None
    elif meta.get("kind") == "adapter":
        registry, task, retrieval = meta.get("registry"), gate.task or "chat", gate.retrieval
        retrieval = retrieval if retrieval is not None else False
    else:
        raise InputError(f"gate: {gate.model!r} is a base model: the gate needs an adapter")
    served = str(registry or "").split("@")[0].split("/")[0]
    if served != name:
        raise InputError(
            f"gate: {gate.model} serves adapter {served or 'none'!r}, not {name!r}: "
            "name a route or base:adapter of this adapter in the gate file"
        )
    labels = {"candidate": candidate} | ({"incumbent": incumbent} if incumbent else {})
    configs = [
        endpoint.Configuration(f"{side} v{version}", gate.model, task, retrieval, version)
        for side, version in labels.items()
    ]
    total = len(questions) * len(configs)
    with tqdm(total=total, desc="gate", unit="answer", disable=not progress) as bar:
        records = endpoint.run(
            ep, questions, configs, gate.max_tokens, None, gate.concurrency, bar.update
        )
    errors = [r for r in records if r.error]
    if len(errors) == len(records):
        raise LoraplexError(f"gate: every request failed, e.g. {errors[0].error}")
    summary = endpoint.summarize(records, configs)
    cand = summary[configs[0].name]
    inc = summary[configs[1].name] if incumbent else None
    checks = judge(gate.metrics, cand, inc, gate.within_noise)
    passed = all(c.passed for c in checks)
    folder = out or settings.home / "reports" / f"gate-{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    verdict = "passed" if passed else "refused"
    advice = f"Gate {verdict} for {name} version {candidate} -> @{alias}:\n\n" + "\n".join(
        f"- {c.line()}" for c in checks
    )
    report_meta = {
        "url": url,
        "questions_file": str(gate.questions),
        "questions": len(questions),
        "configs": [c.name for c in configs],
        "date": dt.date.today().isoformat(),
        "max_tokens": gate.max_tokens,
    }
    written = report.write_report(
        folder, summary, endpoint.records_as_dicts(records), report_meta, advice
    )
    result = GateResult(name, alias, candidate, incumbent, passed, checks, str(written))
    result.summary = summary
    result.mlflow_run_id = _log_gate(settings, result, written)
    return result


def _log_gate(settings: LoraplexConfig, result: GateResult, folder: Path) -> str:
    """One MLflow run: the decision, both versions, every metric and check, the report."""
    import mlflow

    experiment_id = tracking.setup(settings)
    run_name = f"gate-{result.name}-v{result.candidate}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.set_tags(
            {
                tags.KIND: tags.KIND_PROMOTION_GATE,
                tags.ADAPTER: result.name,
                tags.ALIAS: result.alias,
                tags.CANDIDATE_VERSION: result.candidate,
                tags.INCUMBENT_VERSION: result.incumbent or "",
                tags.DECISION: "passed" if result.passed else "refused",
            }
        )
        for config, s in result.summary.items():
            for key in (*endpoint.METRICS, "errors"):
                if s.get(key) is not None:
                    side = config.split(" ")[0]
                    mlflow.log_metric(metric_key(side, key), float(s[key]))
        mlflow.log_dict(
            {"checks": [c.__dict__ for c in result.checks], "passed": result.passed},
            "gate.json",
        )
        mlflow.log_artifacts(str(folder), artifact_path="report")
        return run.info.run_id
