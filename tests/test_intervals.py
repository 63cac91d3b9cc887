"""Confidence intervals of the evaluation: known answers, and the report that shows them."""

from __future__ import annotations

import pytest

from loraplex.evaluation import report
from loraplex.evaluation.endpoint import Configuration, Record, summarize
from loraplex.evaluation.intervals import bootstrap, paired_difference, wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)  # fmt: skip
def test_wilson_matches_the_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got is not None and (round(got[0], 4), round(got[1], 4)) == (lo, hi)
    assert wilson(0, 0) is None


def test_bootstrap_and_paired_difference() -> None:
    lo, hi = bootstrap([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert bootstrap([]) is None and bootstrap([3.0]) == (3.0, 3.0)
    a = {str(i): 0.0 for i in range(80)}
    b = {str(i): 1.0 if i < 54 else 0.0 for i in range(80)}
    value, (lo, hi) = paired_difference(a, b)
    assert value == pytest.approx(54 / 80) and lo > 0.5 and hi < 0.8
    assert paired_difference(a, {"x": 1.0}) is None  # no common question


def _records(config: str, right: int, n: int, compliant: bool | None = None) -> list[Record]:
    return [
        Record(
            config,
            f"q{i}",
            latency_s=0.1 * (i % 7 + 1),
            exact=float(i < right),
            answer_accuracy=float(i < right),
            compliant=compliant,
        )
        for i in range(n)
    ]


def test_the_report_shows_every_interval_and_which_differences_are_noise(tmp_path) -> None:
    configs = [Configuration(name, name) for name in ("base", "base+rag", "adapter", "adapter+rag")]
    records = (
        _records("base", 2, 40)
        + _records("base+rag", 28, 40)
        + _records("adapter", 2, 40, True)
        + _records("adapter+rag", 29, 40, True)
    )
    summary = summarize(records, configs)
    ci = summary["base+rag"]["intervals"]
    assert ci["answer_accuracy"] == [round(x, 4) for x in wilson(28, 40)]
    p95 = round(summary["base+rag"]["latency_p95_s"], 4)
    assert ci["latency_p95_s"][0] <= p95 <= ci["latency_p95_s"][1]
    advice = report.recommend(summary, format_required=False)
    assert "Retrieval adds +65 points of accuracy on the base model (95% interval +" in advice
    text = report.markdown(summary, {"url": "u", "questions_file": "q", "questions": 40,
                                     "date": "d"}, advice)  # fmt: skip
    assert "| base+rag | 0.70 [0.55, 0.82] |" in text
    lines = {ln.split(" | ")[0]: ln for ln in text.splitlines() if ln.startswith("| retrieval")}
    assert lines["| retrieval, on the base model"].endswith("| yes |")
    adapter_line = next(ln for ln in text.splitlines() if ln.startswith("| the adapter, with"))
    assert "| +2 |" in adapter_line and adapter_line.endswith("| within noise |")
