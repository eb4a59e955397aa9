"""The critical batch size: the fit of S(B) = S_min (1 + B_noise/B)
recovers a known B_noise with a bootstrap CI that covers it, the report section appears exactly
when the sweep can support it, and the lr-rule comparison ranks the flattest rule first.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

import math

import numpy as np

from ayt.metrics import FID_1STEP, FID_2STEP
from ayt.studies.report.critical_batch import Point, crossing, fit, lr_rule_spread, measure, section
from ayt.studies.report.write import Trial
from ayt.training.noise_scale import NOISE_SCALE

BATCHES = (8, 16, 32, 64, 128)


def _steps(batch: int, s_min: float, b_noise: float) -> float:
    return s_min * (1 + b_noise / batch)


def _noisy_points(rng, seeds: int, s_min: float = 400.0, b_noise: float = 40.0) -> list[Point]:
    """S = S_min (1 + B_noise/B) × 5% log-normal noise per seed and per trial."""
    points = []
    for seed in range(seeds):
        seed_effect = rng.lognormal(0, 0.05)
        for b in BATCHES:
            points.append(Point("loss=x", b, str(seed), _steps(b, s_min, b_noise) * seed_effect * rng.lognormal(0, 0.05)))
    return points


def test_fit_recovers_a_known_noise_scale_from_noisy_data():
    """B_noise = 40 within 15% on one noisy sweep of 5 seeds, and its 95% bootstrap CI covers
    it in most of 40 such sweeps (measured: 88% at 5 seeds, 76% at 3: a
    percentile bootstrap over few seeds is too narrow, which the report says). Mutations
    caught: B_noise as intercept/slope, the intercept taken as E_min, a CI of zero width."""
    result = fit(_noisy_points(np.random.default_rng(3), seeds=5))
    assert abs(result.b_noise / 40.0 - 1) < 0.15
    assert abs(result.s_min / 400.0 - 1) < 0.15
    assert result.ci[0] < result.b_noise < result.ci[1]
    assert math.isclose(result.e_min, result.s_min * result.b_noise)
    rng = np.random.default_rng(0)
    covered = [low < 40.0 < high for low, high in (fit(_noisy_points(rng, seeds=5), bootstrap=300).ci
                                                   for _ in range(40))]
    assert sum(covered) >= 28
    # Noise-free: exact.
    exact = fit([Point("s", b, str(k), _steps(b, 400.0, 40.0)) for k in range(2) for b in BATCHES])
    assert math.isclose(exact.b_noise, 40.0, rel_tol=1e-9) and math.isclose(exact.s_min, 400.0, rel_tol=1e-9)


def test_crossing_interpolates_between_evaluations():
    """Mutation caught: returning the evaluation after the crossing (quantised steps)."""
    assert crossing([(100, 40.0), (200, 20.0), (300, 10.0)], 30.0) == 150.0
    assert crossing([(100, 25.0), (200, 20.0)], 30.0) == 100.0
    assert crossing([(100, 40.0), (200, 35.0)], 30.0) is None


def _trial(loss: str, batch: int, seed: int, s_b: float, rule: str | None = None,
           noise_scale: list | None = None) -> Trial:
    """FID 20·S_B/s at s = S_B/2, S_B, 2·S_B: every group's best is 10, reached at 2·S_B."""
    curve = [(s_b / 2, 40.0), (s_b, 20.0), (2 * s_b, 10.0)]
    axes = {"batch_size": str(batch), "loss": loss, **({"lr_scaling": rule} if rule else {}), "seed": str(seed)}
    curves = {FID_1STEP: curve, FID_2STEP: curve}
    if noise_scale:
        curves[NOISE_SCALE] = noise_scale
    return Trial(run_id=f"{loss}{batch}{seed}{rule}", name=f"{loss}-b{batch}-s{seed}", axes=axes, batch_size=batch,
                 status="FINISHED", stopped_early=False, curves=curves, train_seconds=1.0)


def _sweep(seeds=(0, 1, 2), batches=BATCHES, b_noise={"pseudo_huber": 20.0, "mfd": 80.0}):
    return [_trial(loss, b, s, _steps(b, 300.0, bn) * (1 + 0.02 * (s - 1)), noise_scale=[(10, bn), (20, bn)])
            for loss, bn in b_noise.items() for b in batches for s in seeds]


def test_measure_uses_a_shared_target_and_recovers_each_loss(tmp_path):
    """Mutations caught: a per-group target (every group's own best), fitting both losses
    together, or steps not multiplied by the batch in images."""
    m = measure(_sweep(), FID_1STEP, bootstrap=200)
    assert m.target == 10.0 and not m.missed
    assert math.isclose(m.fits["loss=mfd"].b_noise, 80.0, rel_tol=0.02)
    assert math.isclose(m.fits["loss=pseudo_huber"].b_noise, 20.0, rel_tol=0.02)
    point = m.points["loss=mfd"][0]
    assert point.images == point.steps * point.batch


def test_section_appears_only_for_batch_size_sweeps_with_enough_seeds_and_batches(tmp_path):
    """Mutations caught: a section for studies without a batch_size axis, a full section
    (and a fit) from one seed or two batch sizes, a missing plot or B_noise row."""
    full = section(_sweep(), FID_1STEP, tmp_path, "t", bootstrap=200)
    text = "\n".join(full.lines)
    assert "## Critical batch size" in text and "critical_batch.png" in text
    assert "| loss=mfd | 10.0 | 80." in text and "| loss=pseudo_huber | 10.0 | 20." in text
    assert "| 80.0 | 80.0 ± 0.0 (n=15) |" in text        # B_simple: last evaluation, and over the run
    assert "pooled over batch sizes: loss=mfd 80.0 ± 0.0 (n=15); loss=pseudo_huber 20.0 ± 0.0 (n=15)." in text
    assert "- loss=mfd − loss=pseudo_huber, each seed's mean over batch sizes and rules, paired by seed: higher: +60" in text
    assert "(paired t, n=3); loss=mfd higher at 5 of 5 batch sizes" in text
    from ayt.studies.report.write import _write_curves_csv
    header = open(_write_curves_csv(_sweep(), tmp_path / "curves.csv")).readline()
    assert header.strip().endswith("fid_1step,fid_2step,noise_scale")
    assert (tmp_path / "critical_batch.png").is_file() and full.files
    assert "Learning-rate scaling" not in text            # lr_scaling is not an axis here
    one_seed = "\n".join(section(_sweep(seeds=(0,)), FID_1STEP, tmp_path).lines)
    assert "Not computed" in one_seed and "1 seed" in one_seed and "B_noise [" not in one_seed
    two_batches = "\n".join(section(_sweep(batches=(16, 32)), FID_1STEP, tmp_path).lines)
    assert "Not computed" in two_batches and "2 batch sizes" in two_batches
    no_axis = [Trial("r", "n", {"loss": "mfd", "seed": "0"}, 16, "FINISHED", False, {FID_1STEP: [(1, 1.0)]})]
    assert section(no_axis, FID_1STEP, tmp_path).lines == []


def test_lr_rule_comparison_ranks_the_flattest_rule_first(tmp_path):
    """images to target = B·S(B): flat across B when S ∝ 1/B ("sqrt" here), growing ∝ B when S
    is constant ("none"). Mutations caught: ranking by the largest spread, or ranking a rule
    with a trial that misses the target above one that reaches it everywhere (here "linear",
    whose CV alone is lower than "none"'s)."""
    trials = []
    for s in (0, 1):
        for b in BATCHES[:3]:
            trials.append(_trial("mfd", b, s, 3200.0 / b, rule="sqrt"))       # images 3200 at every b
            trials.append(_trial("mfd", b, s, 100.0, rule="none"))            # images 100·b
            trials.append(_trial("mfd", b, s, 3200.0 / b * (1 + b / 16), rule="linear"))
    # "linear" at b32, seed 1 stops above the shared target (then 20: that group's mean best).
    trials = [t if not (t.axes["lr_scaling"] == "linear" and t.batch_size == 32 and t.seed == "1") else
              Trial(t.run_id, t.name, t.axes, 32, "FINISHED", False, {FID_1STEP: [(10, 40.0), (20, 30.0)]})
              for t in trials]
    m = measure([t for t in trials if t.axes["lr_scaling"] != "linear"], FID_1STEP, bootstrap=50)
    m_all = measure(trials, FID_1STEP, bootstrap=50)
    rows = lr_rule_spread(m_all)
    assert [r["series"] for r in rows] == ["loss=mfd, lr_scaling=sqrt", "loss=mfd, lr_scaling=none",
                                           "loss=mfd, lr_scaling=linear"]
    assert rows[0]["cv"] < 1e-9 and rows[-1]["missed_batches"] == [32] and rows[-1]["cv"] < rows[1]["cv"]
    assert m.target == 10.0 and m_all.target == 20.0
    text = "\n".join(section(trials, FID_1STEP, tmp_path, bootstrap=50).lines)
    assert "### Learning-rate scaling" in text and "Flattest for loss=mfd: lr_scaling=sqrt (CV 0.000)" in text


def _fixed_eval_trial(loss: str, batch: int, seed: int, s_b: float, scale: float) -> Trial:
    """Evaluations every 100 steps (as a real study: not at multiples of S_B), FID = scale·S_B/s."""
    curve = [(s, scale * s_b / s) for s in range(100, 1001, 100)]
    return Trial(run_id=f"{loss}{batch}{seed}", name=f"{loss}-b{batch}-s{seed}",
                 axes={"batch_size": str(batch), "loss": loss, "seed": str(seed)}, batch_size=batch,
                 status="FINISHED", stopped_early=False, curves={FID_1STEP: curve, FID_2STEP: curve})


def test_per_series_target_resolves_a_fast_loss_that_a_shared_target_cannot(tmp_path):
    """A fast loss (S_B = 30(1 + 20/B)) beside a slow one (S_B = 300(1 + 80/B)): the shared target
    (the slow loss's loosest) is passed by every fast trial before its first evaluation, so the
    fast series is flagged "not resolved"; per_series targets recover both B_noise (within 25%:
    steps are interpolated linearly on a 1/s curve). Mutations caught: per_series still using
    one target, the flag missing or raised for a resolved series, the scope not reaching the
    section's text."""
    trials = [_fixed_eval_trial(loss, b, seed, s_min * (1 + bn / b) * (1 + 0.01 * seed), scale)
              for loss, s_min, bn, scale in (("fast", 30.0, 20.0, 1.0), ("slow", 300.0, 80.0, 1.0))
              for b in BATCHES for seed in (0, 1, 2)]
    shared = measure(trials, FID_1STEP, bootstrap=100)
    assert shared.unresolved == ["loss=fast"] and len(set(shared.targets.values())) == 1
    per = measure(trials, FID_1STEP, bootstrap=100, scope="per_series")
    assert per.unresolved == [] and per.targets["loss=fast"] < per.targets["loss=slow"]
    assert abs(per.fits["loss=fast"].b_noise / 20.0 - 1) < 0.25, per.fits["loss=fast"]
    assert abs(per.fits["loss=slow"].b_noise / 80.0 - 1) < 0.25, per.fits["loss=slow"]
    text = "\n".join(section(trials, FID_1STEP, tmp_path, bootstrap=100).lines)
    assert "loss=fast: every trial was at the target by its first evaluation" in text and "(not resolved)" in text
    text = "\n".join(section(trials, FID_1STEP, tmp_path, bootstrap=100, scope="per_series").lines)
    assert "per series (`study.critical_batch.target=per_series`)" in text and "not resolved" not in text


def test_bad_critical_batch_target_fails_before_any_work(tmp_path, capsys):
    from ayt.studies.runner import study_main
    code = study_main("critical_batch_sweep", [f"out_dir={tmp_path}", "study.critical_batch.target=each", "--cfg"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "study.critical_batch.target" in err and "allowed: shared, per_series" in err, err


def test_divergence_catches_a_run_that_ends_far_above_its_best():
    """critical_batch_sweep's trial 7127350e went 1223, 335, 1537, 1381, 1331, 915: never 10%
    above its (untrained) first evaluation at the end, so the first-evaluation rule missed it;
    it ends at 2.7× its best. One that ends at 1.9× its best is not diverged, and the
    first-evaluation rule still answers first. Mutations caught: the new rule missing, the
    factor applied to the first evaluation instead of the best, or `>=` 1× (any rise)."""
    def trial(values: list[float]) -> Trial:
        return Trial("r", "n", {"loss": "mfd", "seed": "0"}, 8, "FINISHED", False,
                     {FID_1STEP: [(50 * (i + 1), v) for i, v in enumerate(values)]})
    why = trial([1223.3, 335.2, 1536.6, 1381.0, 1331.2, 914.6]).divergence(FID_1STEP)
    assert why and "best 335.2" in why and "1536.6" in why and "914.6" in why, why
    assert trial([1223.3, 335.2, 600.0, 636.0]).divergence(FID_1STEP) is None
    assert trial([1223.3, 335.2, 300.0, 320.0]).divergence(FID_1STEP) is None
    assert "first evaluation" in trial([100.0, 40.0, 130.0, 125.0]).divergence(FID_1STEP)
