"""How a study decides (ayt/studies/protocols/decision.py, stats, seed_plan): intervals at the level its
seed rounds decided at, detectable differences with the SD's own uncertainty, and a seed plan
before running. Each number is checked against the distribution or a simulation of the same
test, so a normal approximation, a one-sided quantile or a level left at 95% fails here."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from ayt.studies.protocols import decision

from ayt.studies.protocols import seed_rounds

from ayt.studies.report import stats
from ayt.studies.engine.plan import plan_study
from ayt.studies.protocols.seed_plan import load_pilot, plan_seeds, spreads
from ayt.studies.protocols.endpoint import Endpoint

REPS = 20_000


def _pilot(path: Path, metric: str = "fid_1step", sd: float = 6.0, seeds: int = 6, evals: int = 4,
           seconds: float = 100.0) -> Path:
    """A finished study's report directory: curves.csv (two losses paired by seed, MFD 5 worse
    with per-seed differences of SD `sd` at every evaluation) and trials.csv (durations)."""
    rng = np.random.default_rng(3)
    path.mkdir(parents=True, exist_ok=True)
    diffs = rng.normal(0, 1, seeds)
    diffs = 5 + sd * (diffs - diffs.mean()) / diffs.std(ddof=1)
    rows, trials = [], []
    for loss in ("pseudo_huber", "mfd"):
        for s in range(seeds):
            run = f"{loss}-s{s}"
            for e in range(1, evals + 1):
                value = 80 + 100 / e + s + (diffs[s] if loss == "mfd" else 0)
                rows.append({"run": run, "axis.loss": loss, "axis.seed": s, "iteration": 100 * e,
                             "images_seen": 1600 * e, metric: value})
            trials.append({"run": run, "axis.loss": loss, "axis.seed": s, "status": "FINISHED",
                           "iterations": 100 * evals, "train_seconds": seconds})
    for name, data in (("curves.csv", rows), ("trials.csv", trials)):
        with (path / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    return path


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_sd_bound_matches_the_chi_square_quantile(n):
    """sd·√((n−1)/χ²₀.₀₂₅,ₙ₋₁): ×2.87 at n = 5, and in a simulation the true SD lies above it in
    2.5% of samples."""
    factor = stats.sd_upper_factor(n - 1)
    assert factor == pytest.approx(math.sqrt((n - 1) / st.chi2.ppf(0.025, n - 1)))
    if n == 5:
        assert factor == pytest.approx(2.87, abs=0.005)
    rng = np.random.default_rng(n)
    sds = rng.normal(0, 1.0, (REPS, n)).std(axis=1, ddof=1)
    assert (sds * factor < 1.0).mean() == pytest.approx(0.025, abs=0.004)


def test_a_detectable_difference_states_its_value_at_the_sd_bound():
    seeds = range(5)
    c = stats.paired({s: v for s, v in zip(seeds, [10, 30, -5, 20, 0])}, {s: 0.0 for s in seeds})
    assert c.detectable_upper == pytest.approx(c.detectable * stats.sd_upper_factor(4))
    words = c.verdict()
    assert f"detects ±{c.detectable:.3g} at 80% power with n=5 (±{c.detectable_upper:.3g} if the seeds' true SD " \
           "is at the top of its 95% range, 2.87× the one observed)" in words
    w = stats.unpaired([1.0, 4.0, 2.0, 8.0], [0.0, 3.0, 5.0, 1.0])
    assert w.detectable_upper > w.detectable


def test_a_comparison_over_two_looks_states_its_interval_at_97_5_percent():
    """Its interval is the 97.5% t-interval, its p doubled (compared with 0.05), its verdict says
    so, and it is significant exactly when that interval excludes 0."""
    rng = np.random.default_rng(0)
    d = rng.normal(3, 5, 10)
    c = stats.paired({i: v for i, v in enumerate(d)}, {i: 0.0 for i in range(10)}, looks=2)
    half = st.t.ppf(1 - 0.025 / 2, 9) * d.std(ddof=1) / math.sqrt(10)
    assert (c.low, c.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c.level == 0.975 and c.p_decision == pytest.approx(min(1, 2 * st.ttest_1samp(d, 0).pvalue))
    assert "(97.5% interval)" in c.verdict() and "×2 looks" in c.verdict()
    for row in rng.normal(1.5, 5, (40, 10)):         # significant exactly when 0 is outside the 97.5% interval
        c = stats.paired({i: v for i, v in enumerate(row)}, {i: 0.0 for i in range(10)}, looks=2)
        assert c.significant == (c.p_decision < 0.05) == (not c.low <= 0 <= c.high)


def test_the_rounds_decide_and_report_at_their_level():
    """A seed-rounds study's decision names its 2 looks and 97.5%; its rounds decide there too."""
    from omegaconf import OmegaConf

    from ayt.config import compose_config
    study = OmegaConf.to_container(compose_config(["+study=speed_long"]).study, resolve=True)
    found = decision.of(study)
    assert (found.looks, found.level) == (2, 0.975)
    assert "97.5%" in found.words() and "2 looks" in found.words() and "`final`" in found.words()
    assert decision.of({**study, "seed_rounds": {"first": None, "step": 2, "compare": []}}).level == 0.95
    assert seed_rounds.schedule is decision.schedule and seed_rounds.enabled is decision.rounds_enabled


def _simulated_power(delta: float, sd: float, n: int, level: float, rng) -> float:
    d = rng.normal(delta, sd, size=(REPS, n))
    return float((st.ttest_1samp(d, 0.0, axis=1).pvalue < 1 - level).mean())


@pytest.mark.parametrize("endpoint, detect", [("final", "5"), ("last_k", "8%")])
def test_the_plans_seed_count_matches_a_simulation_of_the_paired_test(tmp_path, endpoint, detect):
    """The seeds the plan states have 80% power in a simulation of the paired t-test at the
    pilot's SD, and one seed fewer has less; its cost is the pilot's seconds per image times
    this study's images."""
    pilot = _pilot(tmp_path / "pilot", sd=6.0, seconds=120.0)
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.axes.batch_size=[16]",
                                           "study.axes.loss=[pseudo_huber,mfd]", "study.budget.amount=640",
                                           "study.preset=smoke", f"study.endpoint={endpoint}",
                                           f"study.pilot={pilot}", f"study.detect={detect}"])
    seed_plan = plan_seeds(plan)
    (need,) = seed_plan.needs
    spread = spreads(load_pilot(pilot, "fid_1step"), {"loss": "pseudo_huber"}, plan.endpoint)[0]
    assert need.spread.sd == pytest.approx(spread.sd)
    if detect.endswith("%"):
        assert need.detect == pytest.approx(0.08 * spread.reference_score)
    n = seed_plan.seeds
    rng = np.random.default_rng(1)
    assert _simulated_power(need.detect, need.spread.sd, n, 0.95, rng) > 0.785
    assert _simulated_power(need.detect, need.spread.sd, n - 1, 0.95, rng) < 0.80
    images = 640.0
    assert seed_plan.core_hours(n) == pytest.approx(n * 2 * images * (120.0 / (1600 * 4)) / 3600)
    text = "\n".join(seed_plan.lines())
    assert f"this study needs {n} seeds: {2 * n} trials" in text and "core-hours" in text


def test_a_plan_without_a_pilot_states_its_defaults(tmp_path):
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke"])
    text = "\n".join(plan_seeds(plan).lines())
    one_sd = stats.seeds_needed(1.0, 1.0, lambda k: k - 1)
    assert "no pilot (study.pilot)" in text and f"0.5, 1 or 2 SDs needs" in text and f", {one_sd}, " in text


def test_a_pilot_without_reference_pairs_assumes_no_pairing_benefit(tmp_path):
    """√2 × the pooled SD across seeds: what an unpaired difference of two such groups has."""
    pilot = load_pilot(_pilot(tmp_path / "pilot"), "fid_1step")
    (alone,) = spreads(pilot, {"augment": "geo"}, Endpoint("final"))
    groups = [np.array([t.curve[-1][1] for t in pilot.trials if t.group.get("loss") == loss])
              for loss in ("mfd", "pseudo_huber")]
    pooled = math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / sum(len(g) - 1 for g in groups))
    assert not alone.paired and alone.sd == pytest.approx(math.sqrt(2) * pooled)
