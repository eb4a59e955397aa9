"""Statistics a study report states: confidence intervals across seeds and comparisons of a
group with its reference, each returned as a record (method, estimate, interval, p,
significant) that one table spec renders. Nothing here decides by reading text.

Unpaired: Welch's t-interval for the difference of means. Paired (trials of the two groups
that share a seed share the data order, the noise, the t draws and the FID noise set): the
t-interval of the per-seed differences, with an exact Wilcoxon signed-rank p for small n.

Every comparison also states its power: the smallest true difference its own test would
detect at 80% power (two-sided, the observed SD, its n: the noncentral t), and how many seeds
would detect the difference it observed. A comparison that is not significant is therefore
"inconclusive", with the number that says whether it could have seen the effect at all,
never "equal". The observed SD is itself uncertain at a handful of seeds (at n = 5 its 95%
range is ×0.60–2.87), so beside that difference stands the one the test detects if the true SD is
at the upper end of that range (`sd_upper_factor`: chi-square).

A study that looks at its comparisons more than once (seed rounds: after every round) decides at
95% split over its looks (Bonferroni); its comparisons are made with `looks`, so their interval
is at that level and their p is multiplied by the looks (compared with 0.05 as any other).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
POWER = 0.80
SD_BOUND = 0.95               # the SD's own interval whose upper end the second detectable difference uses
MAX_SEEDS = 10_000            # seeds_needed gives up beyond this (the effect is ~0 next to the noise)


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
    detectable: float = math.nan  # smallest true |difference| this test detects at POWER, at its n
    seeds_needed: int | None = None   # seeds (per group, or pairs) that would detect |estimate| at POWER
    direction: str = "min"       # the quantity's: min (lower is better) | max (ayt/eval/metrics.py)
    detectable_upper: float = math.nan  # `detectable` if the true SD is at the upper end of its SD_BOUND interval
    level: float = LEVEL         # the interval's level: 1 - (1 - LEVEL) / looks
    looks: int = 1               # how many times the study looked at this comparison (p is multiplied by it)

    @property
    def p_decision(self) -> float:
        """p at the study's decision level: Bonferroni over its looks, compared with 1 − LEVEL."""
        return min(1.0, self.p * self.looks) if math.isfinite(self.p) else self.p

    @property
    def available(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def outcome(self) -> str:
        """better | worse | inconclusive | n/a: what the comparison concludes, in the quantity's
        direction (a negative difference is better where lower is better)."""
        if not self.available:
            return "n/a"
        lower_wins = self.direction == "min"
        return ("better" if (self.estimate < 0) == lower_wins else "worse") if self.significant else "inconclusive"

    def power_words(self) -> str:
        """What a non-significant result could have seen: "detects ±D at 80% with n=5; ~N seeds
        would detect the observed X"."""
        if not math.isfinite(self.detectable):
            return ""
        words = f"detects ±{self.detectable:.3g} at {POWER:.0%} power with n={self.n}"
        if self.looks > 1:
            words += f" (at {self.level:.1%}, its {self.looks} looks)"
        if math.isfinite(self.detectable_upper):
            words += (f" (±{self.detectable_upper:.3g} if the seeds' true SD is at the top of its {SD_BOUND:.0%} "
                      f"range, {self.detectable_upper / self.detectable:.2f}× the one observed)")
        if self.estimate == 0:
            return words + "; no number of seeds detects the observed 0"
        if self.seeds_needed is None:
            return words + f"; more than {MAX_SEEDS:,} seeds would be needed for the observed {abs(self.estimate):.3g}"
        return words + f"; ~{self.seeds_needed} seeds would detect the observed {abs(self.estimate):.3g}"

    def verdict(self, lower: str = "better", higher: str = "worse") -> str:
        """Plain words for a table cell: the direction when it is significant, otherwise
        "inconclusive" with the test's power. `lower`/`higher` name the better/worse outcome
        (e.g. faster/slower)."""
        if not self.available:
            return f"n/a ({self.method})"
        outcome = {"better": lower, "worse": higher}.get(self.outcome, self.outcome)
        rank = ""
        if math.isfinite(self.p_rank):
            floor = 2 * 0.5 ** self.n
            rank = f", Wilcoxon p={self.p_rank:.2g}" + (f" (its floor at n={self.n})"
                                                          if self.p_rank <= floor * (1 + 1e-9) else "")
        power = f"; {self.power_words()}" if self.outcome == "inconclusive" and self.power_words() else ""
        if self.looks > 1:             # decided over several looks: the interval and p at that level
            return (f"{outcome}: {self.estimate:+.3g} [{self.low:+.3g}, {self.high:+.3g}] ({self.level:.1%} "
                    f"interval), p={self.p_decision:.2g} (×{self.looks} looks, Bonferroni){rank} "
                    f"({self.method}, n={self.n}){power}")
        return (f"{outcome}: {self.estimate:+.3g} [{self.low:+.3g}, {self.high:+.3g}], "
                f"p={self.p:.2g}{rank} ({self.method}, n={self.n}){power}")


def t_test_power(delta: float, se: float, dof: float, level: float = LEVEL) -> float:
    """Power of a two-sided t-test at true difference `delta` with standard error `se` and
    `dof` degrees of freedom: the chance |T| exceeds the critical t when T is noncentral t."""
    from scipy import stats
    crit = stats.t.ppf(0.5 + level / 2, dof)
    ncp = abs(delta) / se
    upper, lower = stats.nct.sf(crit, dof, ncp), stats.nct.cdf(-crit, dof, ncp)
    # scipy's far tail of the noncentral t can be nan where it is ~0 (large ncp)
    return float(np.nan_to_num(upper, nan=1.0) + np.nan_to_num(lower, nan=0.0))


def detectable_difference(se: float, dof: float, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true |difference| a two-sided t-test with this standard error and degrees
    of freedom detects with probability `power` (nan when the test has no spread to work on)."""
    from scipy.optimize import brentq
    if not (math.isfinite(se) and se > 0 and dof > 0):
        return math.nan
    high = se
    while t_test_power(high, se, dof, level) < power:
        high *= 2
    return float(brentq(lambda d: t_test_power(d, se, dof, level) - power, 0.0, high, xtol=se * 1e-6))


def sd_upper_factor(dof: float, bound: float = SD_BOUND) -> float:
    """How far above the observed SD the upper end of its two-sided `bound` interval lies:
    √(dof / χ²_{(1−bound)/2, dof}) (×2.87 at 4 degrees of freedom, ×1.83 at 9)."""
    from scipy import stats
    if not dof > 0:
        return math.nan
    return math.sqrt(dof / stats.chi2.ppf((1 - bound) / 2, dof))


def decision_level(looks: int, level: float = LEVEL) -> float:
    """The level each of `looks` looks decides at, so that any false decision stays at 1 − level."""
    return 1 - (1 - level) / max(1, int(looks))


def seeds_needed(difference: float, unit_sd: float, dof_at, level: float = LEVEL,
                 power: float = POWER) -> int | None:
    """Smallest n whose test detects |difference| at `power` (None beyond MAX_SEEDS), for a test
    whose standard error at n seeds is unit_sd/√n with `dof_at(n)` degrees of freedom. The
    normal approximation's n is a lower bound (the t-test needs at least as many), so the exact
    answer is found by stepping up from it."""
    from scipy import stats
    target = abs(difference)
    if not (target > 0 and math.isfinite(unit_sd) and unit_sd > 0):
        return None
    z = stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power)
    n = max(2, math.ceil((z * unit_sd / target) ** 2))
    while n <= MAX_SEEDS:
        if detectable_difference(unit_sd / math.sqrt(n), dof_at(n), level, power) <= target:
            return n
        n += 1
    return None


def unpaired(group: Sequence[float | None], reference: Sequence[float | None], level: float = LEVEL,
             direction: str = "min", looks: int = 1) -> Comparison:
    """Welch's t-interval and test for mean(group) − mean(reference); `direction`: which sign is
    better (the metric's, `ayt.eval.metrics.direction`); at `level` split over `looks`."""
    return dataclasses.replace(_unpaired(group, reference, decision_level(looks, level)), direction=direction,
                               looks=looks)


def _unpaired(group: Sequence[float | None], reference: Sequence[float | None], level: float) -> Comparison:
    from scipy import stats
    a, b = finite(group), finite(reference)
    if len(a) < 2 or len(b) < 2:
        return Comparison(method=_too_few(len(a), len(b)), n=min(len(a), len(b)), level=level)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison("Welch t", diff, diff, diff, 0.0 if diff else 1.0, min(len(a), len(b)), diff != 0,
                          level=level)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    sa2, sb2 = a.var(ddof=1), b.var(ddof=1)          # n seeds in each group at the observed SDs:
    dof_at = (lambda n: (n - 1) * (sa2 + sb2) ** 2 / (sa2 ** 2 + sb2 ** 2)) if sa2 + sb2 > 0 else (lambda n: n - 1)
    detectable = detectable_difference(se, dof, level)
    return Comparison("Welch t", diff, diff - half, diff + half, p, min(len(a), len(b)), p < 1 - level,
                      detectable=detectable, seeds_needed=seeds_needed(diff, math.sqrt(sa2 + sb2), dof_at, level),
                      detectable_upper=detectable * sd_upper_factor(dof), level=level)


def paired(group: Mapping[str, float | None], reference: Mapping[str, float | None],
           level: float = LEVEL, direction: str = "min", looks: int = 1) -> Comparison:
    """Per-seed differences group − reference: their t-interval and t-test p (the verdict),
    and the exact Wilcoxon signed-rank p beside it (no normality assumed; note that with
    n ≤ 5 it cannot go below 0.0625 two-sided, so it can only warn, not confirm).
    `direction`: which sign is better (the metric's); at `level` split over `looks`."""
    return dataclasses.replace(_paired(group, reference, decision_level(looks, level)), direction=direction,
                               looks=looks)


def _paired(group: Mapping[str, float | None], reference: Mapping[str, float | None], level: float) -> Comparison:
    from scipy import stats
    seeds = sorted(s for s in group if s in reference and _ok(group[s]) and _ok(reference[s]))
    d = np.asarray([group[s] - reference[s] for s in seeds], dtype=float)
    if len(d) < 2:
        return Comparison(method=f"paired: {len(d)} shared seed(s), need ≥ 2", n=len(d), level=level)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return Comparison("paired t", mean, mean, mean, 0.0 if mean else 1.0, len(d), mean != 0,
                          1.0 if mean == 0 else float(2 * 0.5 ** len(d)), level=level)
    se = sd / math.sqrt(len(d))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * se)
    p = float(2 * stats.t.sf(abs(mean) / se, len(d) - 1))
    rank = float(stats.wilcoxon(d, alternative="two-sided", method="exact" if len(d) <= 25 else "auto").pvalue)
    detectable = detectable_difference(se, len(d) - 1, level)
    return Comparison("paired t", mean, mean - half, mean + half, p, len(d), p < 1 - level, rank,
                      detectable=detectable, seeds_needed=seeds_needed(mean, sd, lambda n: n - 1, level),
                      detectable_upper=detectable * sd_upper_factor(len(d) - 1), level=level)


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
