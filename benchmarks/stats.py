"""The verdict rules every comparison benchmark uses, in one place so that they are tested once.

Two designs, two rules:
- ``pooled_verdict``: two arms trained on separate seeds (MorphNet against the width multiplier
  retrained from scratch): the gap of the means against twice the pooled standard error
  ``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``.
- ``paired_verdict``: two arms that start from the same trained seed network, seed by seed (the
  compression benchmark): the mean of the per-seed differences against twice its standard error
  ``sd(d) / sqrt(n)``, which removes the seed-to-seed spread both arms share.
A win (loss) is called only beyond twice the standard error; anything else is a tie; with fewer
than two values on a side there is no verdict ("n/a").
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    values = list(values)
    if not values:
        raise ValueError("mean_sd: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def _verdict(gap: float, se: float) -> str:
    if math.isnan(se):
        return "n/a"
    return "win" if gap > 2 * se else "loss" if gap < -2 * se else "tie"


def pooled_verdict(a: Sequence[float], b: Sequence[float]) -> dict:
    """Arm ``a`` against arm ``b`` on independent seeds: gap of the means, twice the pooled SE, verdict."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sd_a ** 2 / len(a) + sd_b ** 2 / len(b)) if min(len(a), len(b)) > 1 else float("nan")
    gap = mean_a - mean_b
    return {"gap": gap, "two_se": 2 * se, "verdict": _verdict(gap, se), "n": min(len(a), len(b))}


def paired_verdict(a: Sequence[float], b: Sequence[float]) -> dict:
    """Arm ``a`` against arm ``b`` paired by seed (``a[i]`` and ``b[i]`` share seed i): mean of the
    differences, twice its SE, verdict, and how many seeds ``a`` is ahead in."""
    if len(a) != len(b):
        raise ValueError(f"paired_verdict: {len(a)} values against {len(b)}; pair them by seed")
    diffs = [x - y for x, y in zip(a, b)]
    gap, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"gap": gap, "two_se": 2 * se, "verdict": _verdict(gap, se), "n": len(diffs),
            "ahead": sum(d > 0 for d in diffs), "diffs": diffs}
