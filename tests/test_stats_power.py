"""Power of the report's comparisons: the detectable difference each comparison
states is checked against a simulation of the same test, so a wrong power formula (a normal
approximation, a one-sided critical value, the wrong degrees of freedom) fails here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from ayt.studies.report import stats

REPS = 20_000


def _paired_power(delta: float, sd: float, n: int, rng) -> float:
    d = rng.normal(delta, sd, size=(REPS, n))
    return float((st.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05).mean())


def _welch_power(delta: float, sd_a: float, sd_b: float, n: int, rng) -> float:
    a, b = rng.normal(delta, sd_a, size=(REPS, n)), rng.normal(0.0, sd_b, size=(REPS, n))
    return float((st.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05).mean())


@pytest.mark.parametrize("n", [3, 5, 10])
def test_paired_detectable_difference_has_80_percent_power_in_a_simulation(n):
    rng = np.random.default_rng(n)
    sd = 10.0
    detect = stats.detectable_difference(sd / math.sqrt(n), n - 1)
    assert abs(_paired_power(detect, sd, n, rng) - 0.80) < 0.015
    assert _paired_power(0.7 * detect, sd, n, rng) < 0.70          # a smaller difference is missed more often


def test_welch_detectable_difference_has_80_percent_power_in_a_simulation():
    """Welch's test with unequal SDs: the stated power uses the Welch degrees of freedom at the
    observed SDs, so it matches the simulated test to within a few points."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 10, 6), rng.normal(0, 20, 6)
    c = stats.unpaired(list(a), list(b))
    sd_a, sd_b = a.std(ddof=1), b.std(ddof=1)
    assert abs(_welch_power(c.detectable, sd_a, sd_b, 6, rng) - 0.80) < 0.03


def test_seeds_needed_is_the_first_n_with_the_power():
    """The seeds a comparison says would detect its observed difference have the power, and one
    seed fewer does not (the exact noncentral t, stepping up from the normal approximation)."""
    sd, diff = 30.0, 12.0
    n = stats.seeds_needed(diff, sd, lambda k: k - 1)
    assert n is not None and n > 2
    assert stats.t_test_power(diff, sd / math.sqrt(n), n - 1) >= 0.80 > stats.t_test_power(diff, sd / math.sqrt(n - 1), n - 2)
    rng = np.random.default_rng(7)
    assert _paired_power(diff, sd, n, rng) > 0.78
    assert stats.seeds_needed(0.0, sd, lambda k: k - 1) is None
    assert stats.seeds_needed(1e-6, sd, lambda k: k - 1) is None        # beyond MAX_SEEDS


def test_a_comparison_that_is_not_significant_is_inconclusive_with_its_power():
    seeds = range(5)
    noisy = stats.paired({s: v for s, v in zip(seeds, [10, 30, -5, 20, 0])}, {s: 0.0 for s in seeds})
    assert noisy.outcome == "inconclusive" and not noisy.significant
    words = noisy.verdict()
    assert words.startswith("inconclusive: +11")
    assert f"detects ±{noisy.detectable:.3g} at 80% power with n=5" in words
    assert f"~{noisy.seeds_needed} seeds would detect the observed 11" in words
    assert "(its floor at n=5)" not in words                            # p_rank 0.25 is above 0.0625
    clear = stats.paired({s: 5.0 + 0.1 * s for s in seeds}, {s: 0.0 for s in seeds})
    assert clear.outcome == "worse" and clear.verdict().startswith("worse: +5.2")
    assert "(its floor at n=5)" in clear.verdict()                     # exact Wilcoxon can go no lower
    assert "detects" not in clear.verdict()
    assert stats.unpaired([1.0], [2.0]).outcome == "n/a"
