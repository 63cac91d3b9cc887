"""The evaluation report: a markdown table, a PNG chart, JSON, and a recommendation.

Owns: turning the per-configuration summary into ``report.md`` (table with 95%
intervals, differences between configurations with theirs, targets met,
recommendation), ``chart.png`` (matplotlib: answer accuracy, JSON compliance,
citation precision and faithfulness per configuration with their 95% intervals as error bars, p50
latency with its interval beside them) and ``results.json`` (summary +
every answer), written into a ``.partial`` folder and renamed only when complete, so an
interrupted evaluation never leaves a report that looks finished; and the
recommendation, derived from the measured trade-off. Does not own: the measurements
(``evaluation.endpoint``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraplex.answers import FAITHFULNESS_RULES
from loraplex.evaluation.intervals import overlaps_zero, paired_difference
from loraplex.evaluation.scorers import ANSWER_ACCURACY_RULES

# The targets of the four standard configurations (issue "The decision, measured").
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "adapter+rag": {
        "accuracy": (">=", 0.8),
        "compliance": (">=", 0.95),
        "citation_precision": (">=", 0.8),
    },
    "base+rag": {"answer_accuracy": (">=", 0.7)},
    "adapter": {"compliance": (">=", 0.95), "answer_accuracy": ("<=", 0.15)},
    "base": {"answer_accuracy": ("<=", 0.15)},
}
COLUMNS = [
    ("accuracy", "accuracy (EM)", "{:.2f}"),
    ("f1", "F1", "{:.2f}"),
    ("answer_accuracy", "answer acc.", "{:.2f}"),
    ("compliance", "JSON compliance", "{:.2f}"),
    ("citation_precision", "citation P", "{:.2f}"),
    ("citation_recall", "citation R", "{:.2f}"),
    ("label_accuracy", "label acc.", "{:.2f}"),
    ("faithfulness", "faithful", "{:.2f}"),
    ("unsupported_claim_rate", "unsupported claims", "{:.2f}"),
    ("citation_validity", "valid citations", "{:.2f}"),
    ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p95_s", "p95 s", "{:.2f}"),
    ("prompt_tokens", "prompt tok", "{:.0f}"),
    ("completion_tokens", "completion tok", "{:.0f}"),
    ("errors", "errors", "{:d}"),
]


SCORING = (
    "Accuracy (EM): the normalised answer equals the normalised gold answer (SQuAD rules: "
    "lower case, punctuation, articles and citation markers removed). For JSON replies the "
    "`answer` field is scored.",
    "",
    ANSWER_ACCURACY_RULES,
    "",
    FAITHFULNESS_RULES,
)


# (from, to, metric, what the difference measures): paired on the same questions
COMPARISONS = [
    ("base", "base+rag", "answer_accuracy", "retrieval, on the base model"),
    ("adapter", "adapter+rag", "accuracy", "retrieval, with the adapter"),
    ("base", "adapter", "compliance", "the adapter, on the format"),
    ("base+rag", "adapter+rag", "accuracy", "the adapter, with retrieval"),
]


def fmt(value: Any, pattern: str, interval: list[float] | None = None) -> str:
    if value is None:
        return "–"
    if not interval:
        return pattern.format(value)
    lo, hi = (pattern.format(v) for v in interval)
    return f"{pattern.format(value)} [{lo}, {hi}]"


def difference(
    summary: dict[str, dict[str, Any]], a: str, b: str, metric: str
) -> tuple[float, tuple[float, float]] | None:
    """B minus A on the questions both answered, with its 95% interval (paired bootstrap
    over questions); None when either configuration did not run or has no such values."""
    if a not in summary or b not in summary:
        return None
    per_a = (summary[a].get("by_question") or {}).get(metric) or {}
    per_b = (summary[b].get("by_question") or {}).get(metric) or {}
    return paired_difference(per_a, per_b)


def points(d: float) -> str:
    return f"{d * 100:+.0f}"


def version_comparisons(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Versions pinned side by side (``adapter/1+rag``, ``adapter/2+rag``: a supervised
    adapter and its preference-tuned version; or ``adapter+rag`` and the fifth column
    ``adapter/2+rag``): each later one against the first, on exact match and
    faithfulness."""
    pinned = [n for n in summary if n.startswith("adapter") and "/" in n]
    if len(pinned) == 1 and pinned[0].endswith("+rag") and "adapter+rag" in summary:
        pinned.insert(0, "adapter+rag")  # the fifth column, against the version served
    return [
        (pinned[0], other, metric, "another version of the adapter")
        for other in pinned[1:]
        if other.endswith("+rag") == pinned[0].endswith("+rag")
        for metric in ("accuracy", "faithfulness")
    ]


def differences(summary: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of the standard comparisons, each with its interval and whether
    the questions tell the difference from noise."""
    rows = []
    for a, b, metric, what in [*COMPARISONS, *version_comparisons(summary)]:
        d = difference(summary, a, b, metric)
        if d is None:
            continue
        value, (lo, hi) = d
        verdict = "within noise" if overlaps_zero((lo, hi)) else "yes"
        rows.append(
            f"| {what} | {metric} | {a} -> {b} | {points(value)} | "
            f"[{points(lo)}, {points(hi)}] | {verdict} |"
        )
    if not rows:
        return []
    return [
        "| what | metric | from -> to | difference (points) | 95% interval | real |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def target_checks(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """(configuration, metric, target, met) for every target whose configuration ran."""
    out = []
    for config, targets in TARGETS.items():
        if config not in summary:
            continue
        for metric, (op, bound) in targets.items():
            value = summary[config].get(metric)
            met = None if value is None else (value >= bound if op == ">=" else value <= bound)
            out.append((config, metric, f"{op} {bound}", met))
    return out


def recommend(summary: dict[str, dict[str, Any]], format_required: bool) -> str:
    """A few sentences: which configuration to use, and what retrieval and the adapter buy."""
    if not summary:
        return "Nothing was measured."
    lines = []
    # answer accuracy: a sentence that states the right answer counts (EM would not)
    acc = {k: v.get("answer_accuracy", v["accuracy"]) for k, v in summary.items()}
    if "base" in acc and "base+rag" in acc:
        gain = acc["base+rag"] - acc["base"]
        extra = _delta(summary, "base", "base+rag", "prompt_tokens")
        d = difference(summary, "base", "base+rag", "answer_accuracy")
        lines.append(
            f"Retrieval adds {points(gain)} points of accuracy on the base model"
            + (f" (95% interval {points(d[1][0])} to {points(d[1][1])})" if d else "")
            + (f" for {extra:+.0f} prompt tokens per question" if extra is not None else "")
            + (
                ": the knowledge has to come from retrieval."
                if gain >= 0.2 and not (d and overlaps_zero(d[1]))
                else "."
            )
        )
    if "adapter" in summary and summary["adapter"].get("compliance") is not None:
        base_c = (summary.get("base") or {}).get("compliance")
        lines.append(
            f"The adapter gives {summary['adapter']['compliance']:.0%} format compliance"
            + (f" (base: {base_c:.0%})" if base_c is not None else "")
            + f" but answers only {acc['adapter']:.0%} correctly without retrieval: "
            "fine-tuning teaches the behaviour, not the facts."
        )
    candidates = {
        k: v
        for k, v in summary.items()
        if not format_required or (v.get("compliance") or 0) >= 0.95
    }
    pool = candidates or summary
    best = max(pool, key=lambda k: (round(acc[k], 2), -(pool[k]["latency_p50_s"] or 0)))
    b = pool[best]
    why = "meets the format" if format_required and candidates else "is the most accurate"
    lines.append(
        f"Recommendation: **{best}** ({why}: answer accuracy {acc[best]:.0%}, "
        f"exact match {b['accuracy']:.0%}"
        + (f", compliance {b['compliance']:.0%}" if b.get("compliance") is not None else "")
        + (
            f", citation precision {b['citation_precision']:.0%}"
            if b.get("citation_precision") is not None
            else ""
        )
        + f", p50 {b['latency_p50_s'] or 0:.2f} s, {b['prompt_tokens'] or 0:.0f} prompt tokens)."
    )
    return " ".join(lines)


def _delta(summary: dict, a: str, b: str, key: str) -> float | None:
    x, y = summary[a].get(key), summary[b].get(key)
    return None if x is None or y is None else y - x


def markdown(summary: dict[str, dict[str, Any]], meta: dict[str, Any], advice: str) -> str:
    head = "| configuration | " + " | ".join(c[1] for c in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, s in summary.items():
        ci = s.get("intervals") or {}
        rows.append(
            f"| {name} | " + " | ".join(fmt(s.get(k), p, ci.get(k)) for k, _, p in COLUMNS) + " |"
        )
    checks = target_checks(summary)
    lines = [
        "# Evaluation",
        "",
        f"Endpoint {meta['url']}, {meta['questions']} questions from `{meta['questions_file']}`"
        + (f", collection `{meta['collection']}`" if meta.get("collection") else "")
        + (
            f", {meta['concurrency']} requests at a time (latencies are under that load)"
            if meta.get("concurrency")
            else ""
        )
        + f", {meta['date']}.",
        "",
        *rows,
        "",
        "Each value comes with its 95% interval: Wilson for rates, a bootstrap (2,000 "
        "resamples) for means and latency percentiles.",
        "",
        *differences(summary),
    ]
    if checks:
        lines += ["| configuration | metric | target | met |", "|---|---|---|---|"]
        mark = {True: "yes", False: "**no**", None: "–"}
        lines += [f"| {c} | {m} | {t} | {mark[ok]} |" for c, m, t, ok in checks]
        lines.append("")
    versions = sorted({v for s in summary.values() for v in s.get("served_versions", [])})
    if versions:
        lines += [f"Adapter versions that answered: {', '.join(versions)}.", ""]
    trained = meta.get("adapters_trained_on_seeds") or {}
    if trained:
        seeds = "; ".join(f"{a}: seed {', '.join(map(str, s))}" for a, s in trained.items())
        world = meta.get("world_seed")
        lines += [
            f"Adapters were trained on worlds {seeds}"
            + (
                f"; the questions come from world seed {world}, which none of them saw."
                if world is not None
                else "."
            ),
            "",
        ]
    lines += ["## Recommendation", "", advice, ""]
    lines += ["## How answers are scored", "", *SCORING, ""]
    return "\n".join(lines)


# What the chart shows: what the table's conclusion rests on (answer accuracy, not exact
# match: base+rag answers in sentences, which exact match scores 0), each with its interval.
CHART_METRICS = [
    ("answer_accuracy", "answer accuracy"),
    ("compliance", "JSON compliance"),
    ("citation_precision", "citation precision"),
    ("faithfulness", "faithfulness"),
]


def chart_series(
    summary: dict[str, dict[str, Any]], key: str
) -> tuple[list[float | None], list[list[float]]]:
    """One metric across the configurations: the values (None where not measured) and
    the error bars below and above each (0 where no interval is known)."""
    values, below, above = [], [], []
    for s in summary.values():
        v = s.get(key)
        lo, hi = (s.get("intervals") or {}).get(key) or (v, v)
        values.append(v)
        below.append(max(0.0, v - lo) if v is not None and lo is not None else 0.0)
        above.append(max(0.0, hi - v) if v is not None and hi is not None else 0.0)
    return values, [below, above]


def chart(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib  # heavy (a second): only writing a report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(names))
    width = 0.8 / len(CHART_METRICS)
    for i, (key, label) in enumerate(CHART_METRICS):
        values, errors = chart_series(summary, key)
        at = x + i * width - 0.4 + width / 2
        bars = ax.bar(at, [v or 0 for v in values], width, yerr=errors, capsize=3, label=label)
        for bar, v in zip(bars, values, strict=True):
            if v is None:  # not measured (no JSON asked for, no sources): say so, not 0
                ax.text(bar.get_x() + width / 2, 0.01, "n/a", ha="center", fontsize=6)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of questions (95% interval)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Quality per configuration")
    values, errors = chart_series(summary, "latency_p50_s")
    ax2.bar(x, [v or 0 for v in values], yerr=errors, capsize=3, color="gray")
    ax2.set_xticks(x, names, rotation=45, fontsize=8)
    ax2.set_ylabel("p50 latency (s, 95% interval)")
    ax2.set_title("Latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path,
    summary: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
    meta: dict[str, Any],
    advice: str,
) -> Path:
    """Write the three files into ``<out_dir>.partial`` and rename it when complete."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        (partial / "results.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "answers": records}, indent=2)
        )
        (partial / "report.md").write_text(markdown(summary, meta, advice))
        chart(summary, partial / "chart.png")
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
