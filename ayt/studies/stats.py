"""Statistics a study report states: confidence intervals across seeds and comparisons of a
group with its reference, each returned as a record (method, estimate, interval, p,
significant) that one table spec renders. Nothing here decides by reading text.

Unpaired: Welch's t-interval for the difference of means. Paired (trials of the two groups
that share a seed share the data order, the noise, the t draws and the FID noise set): the
t-interval of the per-seed differences, with an exact Wilcoxon signed-rank p for small n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95


def finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_ci(values: Sequence[float | None], level: float = LEVEL) -> tuple[float, float, int]:
    """Mean and half-width of a Student-t confidence interval (nan half-width for n < 2)."""
    from scipy import stats
    x = finite(values)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


@dataclass(frozen=True)
class Comparison:
    """A group against its reference on one quantity: estimate = group − reference."""

    method: str                  # how the interval and p were computed, or why there are none
    estimate: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    n: int = 0                   # seeds (pairs, for a paired comparison)
    significant: bool = False    # the interval excludes 0 (equivalently p < 1 - level)
    p_rank: float = math.nan     # paired only: exact Wilcoxon signed-rank p, no normality assumed

    @property
    def available(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def verdict(self, lower: str = "better", higher: str = "worse") -> str:
        """Plain words for a table cell: the direction only when it is significant."""
        if not self.available:
            return f"n/a ({self.method})"
        words = (lower if self.estimate < 0 else higher) if self.significant else "not significant"
        rank = f", Wilcoxon p={self.p_rank:.2g}" if math.isfinite(self.p_rank) else ""
        return (f"{words}: {self.estimate:+.3g} [{self.low:+.3g}, {self.high:+.3g}], "
                f"p={self.p:.2g}{rank} ({self.method}, n={self.n})")


def unpaired(group: Sequence[float | None], reference: Sequence[float | None], level: float = LEVEL) -> Comparison:
    """Welch's t-interval and test for mean(group) − mean(reference)."""
    from scipy import stats
    a, b = finite(group), finite(reference)
    if len(a) < 2 or len(b) < 2:
        return Comparison(method=_too_few(len(a), len(b)), n=min(len(a), len(b)))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison("Welch t", diff, diff, diff, 0.0 if diff else 1.0, min(len(a), len(b)), diff != 0)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return Comparison("Welch t", diff, diff - half, diff + half, p, min(len(a), len(b)), p < 1 - level)


def paired(group: Mapping[str, float | None], reference: Mapping[str, float | None],
           level: float = LEVEL) -> Comparison:
    """Per-seed differences group − reference: their t-interval and t-test p (the verdict),
    and the exact Wilcoxon signed-rank p beside it (no normality assumed; note that with
    n ≤ 5 it cannot go below 0.0625 two-sided, so it can only warn, not confirm)."""
    from scipy import stats
    seeds = sorted(s for s in group if s in reference and _ok(group[s]) and _ok(reference[s]))
    d = np.asarray([group[s] - reference[s] for s in seeds], dtype=float)
    if len(d) < 2:
        return Comparison(method=f"paired: {len(d)} shared seed(s), need ≥ 2", n=len(d))
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return Comparison("paired t", mean, mean, mean, 0.0 if mean else 1.0, len(d), mean != 0,
                          1.0 if mean == 0 else float(2 * 0.5 ** len(d)))
    se = sd / math.sqrt(len(d))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * se)
    p = float(2 * stats.t.sf(abs(mean) / se, len(d) - 1))
    rank = float(stats.wilcoxon(d, alternative="two-sided", method="exact" if len(d) <= 25 else "auto").pvalue)
    return Comparison("paired t", mean, mean - half, mean + half, p, len(d), p < 1 - level, rank)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (scipy has none): the i-th smallest times
    m − i, made monotone and capped at 1. Rejecting where adjusted p < alpha keeps the chance of
    any false rejection among the m at alpha, without Bonferroni's full m× cost. NaN stays NaN."""
    index = [i for i, p in enumerate(ps) if math.isfinite(p)]
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(index, key=lambda j: ps[j])):
        running = max(running, min(1.0, ps[i] * (len(index) - rank)))
        out[i] = running
    return out


def _ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _too_few(n_group: int, n_reference: int) -> str:
    if max(n_group, n_reference) <= 1:
        return "one seed per group: no interval; run more seeds with study.seeds=[0,1,2]"
    return f"needs ≥ 2 finite seeds on both sides, has {n_group} vs {n_reference}"
