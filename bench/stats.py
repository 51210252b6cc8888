"""Paired comparisons for the quality benchmarks: the mean difference of two methods run on the same
seeds (same data order), with its 95% confidence interval (Student's t over the per-seed differences).

Pairing removes what the seed does to both methods alike (initialisation, data order), which is most of
the spread between runs; overlapping standard deviations say little when the seeds move both together.
"""

from __future__ import annotations

import math
import statistics

# Student's t, two-sided 95%, by degrees of freedom (1-30); beyond 30 the normal's 1.96 is within 4%.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the 95% interval of the mean paired difference (NaNs when n < 2)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    df = len(diffs) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def format_difference(a: list[float], b: list[float], digits: int = 3) -> str:
    """``+0.012 [+0.004, +0.020]``, with a star when the interval excludes zero."""
    mean, low, high = paired_difference(a, b)
    star = " *" if low > 0 or high < 0 else ""
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{star}"
