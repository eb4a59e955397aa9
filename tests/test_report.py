"""The study report's statistics on hand-made curves: iterations and images to a target FID,
speed-up against the reference group, and significance only where the 95% CIs are disjoint."""

from __future__ import annotations

import math

from ayt.studies.report import Trial, _findings, _group_rows, mean_ci, targets

STUDY = {"target": {"fid": None, "reference": {"loss": "pseudo_huber"}}}


def _trial(loss: str, seed: int, curve: list[tuple[int, float]], batch: int = 16) -> Trial:
    return Trial(run_id=f"{loss}{seed}", name=f"{loss}-{seed}", axes={"loss": loss, "seed": str(seed)},
                 batch_size=batch, status="FINISHED", stopped_early=False,
                 curves={"fid_1step": curve, "fid_2step": curve}, train_seconds=1.0,
                 artifacts={"feature_map_label_mse": "0.05"} if loss == "mfd" else {})


def _rows(trials):
    tgt = targets(trials, STUDY, "fid_1step")
    return {r["group"]: r for r in _group_rows(trials, tgt, "fid_1step", STUDY)}, tgt


def test_mean_ci_matches_the_t_interval():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert math.isclose(half, 4.302652729911275 * 1.0 / math.sqrt(3), rel_tol=1e-9)
    assert math.isnan(mean_ci([5.0])[1])


def test_fast_group_is_faster_with_disjoint_cis_and_a_speedup():
    slow = [_trial("pseudo_huber", s, [(100, 50.0 + s), (200, 30.0 + s), (400, 20.0 + s)]) for s in range(3)]
    fast = [_trial("mfd", s, [(100, 19.0 + s), (200, 12.0 + s), (400, 10.0 + s)]) for s in range(3)]
    rows, tgt = _rows(slow + fast)
    assert math.isclose(next(iter(tgt.values())), 21.0)           # reference's mean final FID
    mfd, ph = rows["loss=mfd"], rows["loss=pseudo_huber"]
    assert mfd["iters_to_target_mean"] == 100 and mfd["reached"] == 3
    assert ph["vs_reference"] == "reference"
    assert mfd["vs_reference"] == "better (CIs disjoint)"
    assert mfd["speed_vs_reference"] == "faster (CIs disjoint)"
    # The reference reaches its own mean final FID (21) only at 400, in seeds 0 and 1: speed-up 4x.
    assert ph["reached"] == 2 and ph["iters_to_target_mean"] == 400
    assert math.isclose(mfd["speedup_vs_reference"], 4.0)
    assert math.isclose(mfd["feature_map_label_mse"], 0.05)
    text = "\n".join(_findings(list(rows.values()), "fid_1step"))
    assert "loss=mfd vs reference" in text and "4.00×" in text


def test_overlapping_groups_are_not_significant_and_unreached_targets_are_said():
    ref = [_trial("pseudo_huber", s, [(100, 30.0), (200, 20.0 + 4 * s)]) for s in range(3)]
    other = [_trial("mfd", s, [(100, 40.0), (200, 21.0 + 4 * s)]) for s in range(3)]
    rows, _ = _rows(ref + other)
    assert rows["loss=mfd"]["vs_reference"] == "not significant"
    # target 24: mfd seed 0 (21) and 1 (25 > 24: no) — reached in 1 of 3 seeds
    assert rows["loss=mfd"]["speed_vs_reference"] == "reached the target in 1/3 seeds"
    assert "speedup_vs_reference" not in rows["loss=mfd"]
    text = "\n".join(_findings(list(rows.values()), "fid_1step"))
    assert "No difference from the reference group is significant" in text


def test_reference_reaching_its_target_in_one_seed_is_said_not_hidden():
    ref = [_trial("pseudo_huber", s, [(100, 35.0), (200, 10.0 if s == 0 else 40.0)]) for s in range(3)]
    other = [_trial("mfd", s, [(100, 5.0 + s), (200, 4.0 + s)]) for s in range(3)]
    rows, tgt = _rows(ref + other)
    assert math.isclose(next(iter(tgt.values())), 30.0)          # mean of 10, 40, 40
    assert rows["loss=pseudo_huber"]["reached"] == 1
    assert rows["loss=mfd"]["speed_vs_reference"] == "reference reached the target in 1/3 seeds"
