"""95% confidence intervals for evaluation metrics and for differences between two
configurations answering the same questions.

Owns: :func:`wilson` (a rate: k of n), :func:`bootstrap` (any statistic of per-answer
values: means of F1 or citation precision, latency percentiles) and
:func:`paired_difference` (configuration B minus A on the same questions, resampled by
question, so that "+68 points" comes with the range the questions allow), and
:func:`metric_intervals`, which gives every metric of a configuration its interval.
Does not own: the metrics themselves (``endpoint.summarize``) or how they are shown
(``report``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 2000
# metric -> how its interval is computed: a rate of 0/1 answers (Wilson) or a bootstrap
RATES = (
    "accuracy",
    "answer_accuracy",
    "compliance",
    "label_accuracy",
    "faithfulness",
    "unsupported_claim_rate",  # per claim: an answer's claims counted as independent
)
MEANS = ("f1", "citation_precision", "citation_recall", "citation_validity")
PERCENTILES = {"latency_p50_s": 50, "latency_p95_s": 95}


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a rate (None without answers)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` (None without values; a single
    value has no spread to resample)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    stats = np.apply_along_axis(statistic, 1, data[picks])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(
    a: dict[str, float], b: dict[str, float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]] | None:
    """Mean of B minus mean of A over the questions both answered (keyed by question),
    with a bootstrap interval that resamples questions; None without common questions."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = np.array([b[q] - a[q] for q in common], dtype=float)
    interval = bootstrap(diff, resamples=resamples, seed=seed)
    assert interval is not None
    return float(diff.mean()), interval


def metric_intervals(per_answer: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each metric's 95% interval, from its per-answer values (None values left out):
    Wilson for 0/1 rates, a bootstrap of the mean or percentile for the rest."""
    out: dict[str, list[float]] = {}
    for metric, values in per_answer.items():
        if metric in RATES:
            interval = wilson(sum(values), len(values))
        elif metric in PERCENTILES:
            q = PERCENTILES[metric]
            interval = bootstrap(values, lambda x, q=q: float(np.percentile(x, q)))
        else:
            interval = bootstrap(values)
        if interval is not None:
            out[metric] = [round(interval[0], 4), round(interval[1], 4)]
    return out


def overlaps_zero(interval: tuple[float, float]) -> bool:
    return interval[0] <= 0 <= interval[1]
