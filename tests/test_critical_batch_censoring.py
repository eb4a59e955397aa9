"""The critical-batch fit keeps what it cannot see: a trial that never
reaches the target enters the fit right-censored at its last evaluated iteration, the
bootstrap says how many distinct resamples it had, and a B_noise outside the batch sizes
tested is marked as an extrapolation.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize

from ayt.metrics import FID_1STEP
from ayt.studies.report.critical_batch import NoiseFit, Point, fit, measure, section
from ayt.studies.engine.trials import Trial

BATCHES = (8, 16, 32, 64, 128)
SEED_EFFECT = (0.8, 1.0, 1.2)      # seed 2 is the slow one


def _trial(batch: int, seed: int, steps_to_target: float, budget: int, loss: str = "mfd") -> Trial:
    """FID = 10·S/s evaluated every 100 iterations up to `budget`: FID 10 exactly at S."""
    curve = [(s, 10.0 * steps_to_target / s) for s in range(100, budget + 1, 100)]
    return Trial(run_id=f"{loss}{batch}{seed}", name=f"{loss}-b{batch}-s{seed}",
                 axes={"batch_size": str(batch), "loss": loss, "seed": str(seed)}, batch_size=batch,
                 status="FINISHED", stopped_early=False, curves={FID_1STEP: curve})


def _sweep(b_noise: float = 40.0, budget: int = 1600, seeds: int = 3, loss: str = "mfd") -> list[Trial]:
    """S = 300 (1 + B_noise/B) × the seed's effect, no noise. At B_noise 40 the b8 trials need
    1440, 1800, 2160 steps to FID 10; the b8 mean reaches FID 11.25 at 1600, the shared target,
    which seeds 0 and 1 reach (1280, 1600) and seed 2 (1920) does not."""
    effects = SEED_EFFECT if seeds == 3 else tuple(np.linspace(0.8, 1.2, seeds))
    return [_trial(b, k, 300.0 * (1 + b_noise / b) * effects[k], budget, loss) for b in BATCHES for k in range(seeds)]


def _line_at(x: np.ndarray, y: np.ndarray, at: float) -> tuple[float, float, float]:
    """Ordinary least squares y = a + c x: (a, c, its value at `at`)."""
    c, a = np.polyfit(x, y, 1)
    return a, c, a + c * at


def test_a_censored_trial_raises_the_fit_as_a_lower_bound_would():
    """The slow b8 seed never reaches the target within its 1600 iterations. Dropping it (the
    old fit) leaves b8 with its two fast seeds, so the fit at b8 and B_noise come out low; as a
    censored point (steps > 1600) it pulls the fit at b8 up towards its bound, and B_noise up
    towards the truth, 40 (every trial's steps to the target are 300 (1 + 40/B) × its seed's
    effect / 1.125). The fit is the minimum of Σ (S − fit)² over the reached trials plus
    max(0, 1600 − fit)² for the censored one, checked against scipy's general minimiser.
    (Its bound is active here, so the fit is the one with the trial at 1600; the next test has
    one that is not.) Mutations caught: the censored trial dropped (the old fit), or the bound
    applied with the wrong sign (an upper bound would leave the dropped fit)."""
    m = measure(_sweep(), FID_1STEP, bootstrap=50)
    assert math.isclose(m.target, 11.25)
    reached = m.points["loss=mfd"]
    x = np.array([1.0 / p.batch for p in reached])
    y = np.array([p.steps for p in reached])
    a_drop, c_drop, at8_drop = _line_at(x, y, 1 / 8)
    b_drop = c_drop / a_drop
    result = m.fits["loss=mfd"]
    assert b_drop < 38.0                                               # dropping biases B_noise low
    assert b_drop + 0.5 < result.b_noise <= 40.0 + 1e-6, (b_drop, result.b_noise)
    assert float(result.steps(np.array([8.0]))[0]) > at8_drop + 10      # the fit at b8 moves up towards 1600
    assert m.censored["loss=mfd"] == [Point("loss=mfd", 8, "2", 1600.0, censored=True)]
    assert result.censored == 1 and result.seeds == 3 and result.tested == (8, 128)

    def objective(theta: np.ndarray) -> float:
        a, c = theta
        return float(((y - a - c * x) ** 2).sum() + max(0.0, 1600.0 - a - c / 8) ** 2)
    best = minimize(objective, x0=[result.s_min * 0.9, result.s_min * result.b_noise * 1.1], method="Nelder-Mead",
                    options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).x
    assert math.isclose(result.s_min, best[0], rel_tol=1e-5) and math.isclose(result.b_noise, best[1] / best[0], rel_tol=1e-5)


def test_a_censored_point_below_the_fitted_line_changes_nothing():
    """A trial that stopped at 300 iterations, far before the line's 1800 at b8, says only
    "more than 300": consistent with the fit, so the fit is that of the other points.
    Mutation caught: a censored point treated as a measurement at its bound."""
    exact = [Point("s", b, str(k), 300.0 * (1 + 40.0 / b)) for k in range(3) for b in BATCHES]
    with_bound = fit(exact + [Point("s", 8, "3", 300.0, censored=True)], bootstrap=20)
    assert math.isclose(with_bound.b_noise, 40.0, rel_tol=1e-9) and math.isclose(with_bound.s_min, 300.0, rel_tol=1e-9)
    measured = fit(exact + [Point("s", 8, "3", 300.0)], bootstrap=20)
    assert measured.b_noise < 35.0


def test_the_bootstrap_states_its_distinct_resamples_and_when_they_are_too_few(tmp_path):
    """n seeds drawn with replacement have C(2n−1, n) distinct resamples: 10 at 3 seeds (the
    draws of 5,000 resamples show exactly 10), 126 at 5. At 3 seeds the section says the
    bracket is a few refits' spread, not a 95% interval; at 5 it does not. Mutations caught:
    the count as n^n or 2^n, the warning missing or shown at any number of seeds."""
    draws = np.random.default_rng(0).multinomial(3, [1 / 3] * 3, size=5000)
    assert len(np.unique(draws, axis=0)) == NoiseFit(1.0, 1.0, seeds=3).distinct_resamples == 10
    assert NoiseFit(1.0, 1.0, seeds=5).distinct_resamples == 126
    three = "\n".join(section(_sweep(), FID_1STEP, tmp_path, bootstrap=50).lines)
    assert "distinct resamples (3 seeds: 10); too few seeds for the bootstrap" in three
    assert "not a 95% interval" in three
    five = "\n".join(section(_sweep(seeds=5), FID_1STEP, tmp_path, bootstrap=50).lines)
    assert "distinct resamples (5 seeds: 126)." in five and "not a 95% interval" not in five


def test_the_section_counts_censored_trials_and_marks_an_extrapolated_b_noise(tmp_path):
    """The censored trial is named with its batch size, bound and how many of that batch size's
    seeds it is (a trial with no evaluation is listed apart: it has no bound); a fitted B_noise
    of 4 (below the smallest batch tested, 8) is marked as an extrapolation, one of 40 is not.
    Mutations caught: the censored count missing from the table or the list, an unevaluated
    trial censored at 0, the extrapolation check comparing against the wrong end of the range."""
    unevaluated = Trial("r", "n", {"batch_size": "16", "loss": "mfd", "seed": "9"}, 16, "FAILED", False, {})
    text = "\n".join(section(_sweep() + [unevaluated], FID_1STEP, tmp_path, bootstrap=50).lines)
    assert "- loss=mfd: never reached the target, in the fit as censored: 1 of 3 b8 seeds censored at 1600 " \
           "iterations (seed 2)." in text
    assert "- loss=mfd: never evaluated, not in the fit: b16 seed 9." in text
    assert "| 14/16 (1 censored) |" in text
    assert "extrapolation" not in text
    low = "\n".join(section(_sweep(b_noise=4.0, budget=600), FID_1STEP, tmp_path, bootstrap=50).lines)
    row = next(line for line in low.splitlines() if line.startswith("| loss=mfd |"))
    assert "B_noise below the smallest batch tested, 8: an extrapolation" in row, row
    high = NoiseFit(1.0, 300.0, (100.0, 500.0), tested=(8, 128)).extrapolation()
    assert high == "B_noise above the largest batch tested, 128: an extrapolation"
    assert NoiseFit(1.0, 20.0, (2.5, 448.0), tested=(8, 128)).extrapolation() == (
        "CI low end below the smallest batch tested, 8; CI high end above the largest batch tested, 128: an extrapolation")
