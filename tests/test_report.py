"""The study report's statistics on hand-made curves: iterations and images to a target FID,
speed-up against the reference group, comparison records (Welch and paired by seed), and
what the report says when there is nothing to test."""

from __future__ import annotations

import math

from ayt.metrics import FID_1STEP, FID_2STEP
from ayt.studies.report.write import Trial, _findings, _group_rows, code_line, mean_ci, targets
from ayt.studies.report.stats import paired, unpaired

STUDY = {"target": {"fid": None, "reference": {"loss": "pseudo_huber"}}}


def _trial(loss: str, seed: int, curve: list[tuple[int, float]], batch: int = 16) -> Trial:
    return Trial(run_id=f"{loss}{seed}", name=f"{loss}-{seed}", axes={"loss": loss, "seed": str(seed)},
                 batch_size=batch, status="FINISHED", stopped_early=False,
                 curves={FID_1STEP: curve, FID_2STEP: curve}, train_seconds=1.0,
                 artifacts={"feature_map_label_mse": "0.05"} if loss == "mfd" else {})


def _rows(trials):
    tgt = targets(trials, STUDY, FID_1STEP)
    return {r["group"]: r for r in _group_rows(trials, tgt, FID_1STEP, STUDY)}, tgt


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
    final, speed = mfd["comparisons"]["final"], mfd["comparisons"]["images_to_target"]
    assert final.significant and final.estimate == -10.0 and final.high < 0
    assert mfd["vs_reference"].startswith("better: -10 [")
    assert speed.significant and mfd["speed_vs_reference"].startswith("faster")
    # Same seeds on both sides: the paired difference is exactly -10 in every seed.
    assert mfd["comparisons"]["final_paired"].estimate == -10.0 and mfd["comparisons"]["final_paired"].n == 3
    # The reference reaches its own mean final FID (21) only at 400, in seeds 0 and 1: speed-up 4x.
    assert ph["reached"] == 2 and ph["iters_to_target_mean"] == 400
    assert math.isclose(mfd["speedup_vs_reference"], 4.0)
    assert math.isclose(mfd["feature_map_label_mse"], 0.05)
    text = "\n".join(_findings(list(rows.values()), FID_1STEP))
    assert "loss=mfd vs reference" in text and "4.00×" in text


def test_overlapping_groups_are_not_significant_and_unreached_targets_are_said():
    ref = [_trial("pseudo_huber", s, [(100, 30.0), (200, 20.0 + 4 * s)]) for s in range(3)]
    other = [_trial("mfd", s, [(100, 40.0), (200, [21.0, 23.0, 31.0][s])]) for s in range(3)]   # paired: +1, -1, +3
    rows, _ = _rows(ref + other)
    assert not rows["loss=mfd"]["comparisons"]["final"].significant
    assert rows["loss=mfd"]["vs_reference"].startswith("inconclusive")
    # target 24: mfd seeds 0 (21) and 1 (23) reach it, seed 2 (31) does not
    assert rows["loss=mfd"]["speed_vs_reference"] == "reached the target in 2/3 seeds"
    assert not rows["loss=mfd"]["comparisons"]["final_paired"].significant
    assert "speedup_vs_reference" not in rows["loss=mfd"]
    text = "\n".join(_findings(list(rows.values()), FID_1STEP))
    assert "No difference from the reference group is significant" in text


def test_reference_reaching_its_target_in_one_seed_is_said_not_hidden():
    ref = [_trial("pseudo_huber", s, [(100, 35.0), (200, 10.0 if s == 0 else 40.0)]) for s in range(3)]
    other = [_trial("mfd", s, [(100, 5.0 + s), (200, 4.0 + s)]) for s in range(3)]
    rows, tgt = _rows(ref + other)
    assert math.isclose(next(iter(tgt.values())), 30.0)          # mean of 10, 40, 40
    assert rows["loss=pseudo_huber"]["reached"] == 1
    assert rows["loss=mfd"]["speed_vs_reference"] == "reference reached the target in 1/3 seeds"
    # Issue 12, point 6. Mutation caught: publishing the speed-up without the reference having
    # reached its target in >= 2 seeds (the committed feature_map_budget report printed 2.25x).
    assert "speedup_vs_reference" not in rows["loss=mfd"]


def test_one_seed_says_there_is_no_interval_and_how_to_get_one():
    """Mutation caught: the one-seed report claiming 'no difference is significant
    (overlapping CIs)' when there are no CIs at all."""
    rows, _ = _rows([_trial("pseudo_huber", 0, [(100, 30.0), (200, 20.0)]), _trial("mfd", 0, [(100, 40.0), (200, 25.0)])])
    text = "\n".join(_findings(list(rows.values()), FID_1STEP))
    assert "No difference" not in text
    assert "one seed per group" in text and "study.seeds" in text


def test_paired_comparison_sees_a_shift_that_seed_noise_hides_from_welch():
    """Seeds differ a lot from each other, but the group is better than the reference by
    exactly 1 in every seed: only the paired comparison can see it. Mutation caught: pairing
    by position instead of by seed (the shuffled dict order below would break it)."""
    reference = {"0": 10.0, "1": 50.0, "2": 90.0, "3": 130.0, "4": 170.0}
    group = {s: v - 1.0 + 0.01 * int(s) for s, v in reversed(list(reference.items()))}
    assert not unpaired(list(group.values()), list(reference.values())).significant
    result = paired(group, reference)
    assert result.significant and result.high < 0 and result.n == 5
    assert math.isclose(result.estimate, -1.0 + 0.02, rel_tol=1e-9)
    assert math.isclose(result.p_rank, 0.0625)                    # exact Wilcoxon, all 5 signs agree
    assert not paired({"0": 1.0}, {"0": 2.0}).available


def test_diverged_trials_are_counted_and_listed_not_averaged_in_silently():
    from ayt.studies.report.write import _diverged_lines
    rising = _trial("mfd", 0, [(10, 100.0), (20, 130.0), (30, 125.0)])
    recovered = _trial("mfd", 1, [(10, 100.0), (20, 130.0), (30, 95.0)])
    nan = _trial("mfd", 2, [])
    nan.status, nan.failure = "FAILED", "NonFiniteLossError: non-finite loss at iteration 7: loss=nan"
    ok = [_trial("pseudo_huber", s, [(10, 100.0), (20, 80.0), (30, 70.0)]) for s in range(3)]
    assert rising.divergence(FID_1STEP) and nan.divergence(FID_1STEP)
    assert recovered.divergence(FID_1STEP) is None and ok[0].divergence(FID_1STEP) is None
    rows, _ = _rows([rising, recovered, nan, *ok])
    assert rows["loss=mfd"]["diverged"] == "2/3" and "diverged" not in rows["loss=pseudo_huber"]
    lines = "\n".join(_diverged_lines([rising, recovered, nan, *ok], FID_1STEP))
    assert "Diverged trials (2 of 6)" in lines and "seed 0" in lines and "seed 2" in lines and "seed 1" not in lines


def test_protocol_section_names_each_groups_tuned_value_and_its_tuning(tmp_path):
    import json

    from ayt.studies.protocols.tune_then_repeat import TUNING_FILE, report_lines
    study = {"tuned": {"loss=mfd": {"lr": 0.008}, "loss=pseudo_huber": {"lr": 0.002}}}
    assert report_lines({"tuned": {}}, tmp_path) == []
    (tmp_path / TUNING_FILE).write_text(json.dumps({
        "key": "lr", "low": 5e-4, "high": 8e-3, "log": True, "search": "grid", "seeds": [1000], "metric": "fid_1step",
        "groups": {"loss=mfd": {"chosen": 0.008, "means": {"0.002": 300.0, "0.008": 250.0, "0.016": 280.0},
                                "report": "../speed-tune-loss-mfd/report.md"}}}))
    text = "\n".join(report_lines(study, tmp_path))
    assert "| loss=mfd | 0.008 | 0.002: 300.0, 0.008: 250.0, 0.016: 280.0 | ../speed-tune-loss-mfd/report.md |" in text
    assert "| loss=pseudo_huber | 0.002 |" in text and "tuning seeds [1000]" in text


def test_protocol_section_flags_a_choice_at_the_edge_of_the_searched_range(tmp_path):
    import json

    from ayt.studies.protocols.tune_then_repeat import TUNING_FILE, report_lines
    (tmp_path / TUNING_FILE).write_text(json.dumps({"key": "lr", "low": 1e-3, "high": 4e-3, "groups": {
        "loss=a": {"means": {"0.001": 80.0, "0.002": 90.0, "0.004": 95.0}},
        "loss=b": {"means": {"0.001": 99.0, "0.002": 90.0, "0.004": 95.0}}}}))
    text = "\n".join(report_lines({"tuned": {"loss=a": {"lr": 0.001}, "loss=b": {"lr": 0.002}}}, tmp_path))
    assert "| loss=a | 0.001 (edge) |" in text and "| loss=b | 0.002 |" in text
    assert "At the edge of the searched range for loss=a:" in text


def test_fine_tuning_start_fid_is_a_column_when_runs_start_from_the_converged_model():
    """Mutations caught: the converged model's FID left out of the group rows, or a start
    column in studies that do not fine-tune."""
    from ayt.studies.report.write import TABLE
    start = {"converged_fid_1step": "62.0", "converged_fid_2step": "60.5"}
    trials = [Trial(run_id=f"{loss}{s}", name=f"{loss}-{s}", axes={"loss": loss, "seed": str(s)}, batch_size=16,
                    status="FINISHED", stopped_early=False, curves={FID_1STEP: [(100, 64.0 + s)], FID_2STEP: [(100, 63.0)]},
                    train_seconds=1.0, artifacts=start) for loss in ("pseudo_huber", "mfd") for s in range(2)]
    rows, _ = _rows(trials)
    column = next(c for c in TABLE if c.header.startswith("start FID"))
    assert column.cell(rows["loss=mfd"], FID_1STEP) == "62.00 / 60.50" and column.shown(list(rows.values()))
    plain, _ = _rows([_trial("pseudo_huber", 0, [(100, 30.0)])])
    assert "converged_fid_1step" not in plain["loss=pseudo_huber"]


def test_code_line_says_when_trials_ran_on_different_code():
    """Provenance: one version is named once; two are each counted, and a trial
    resumed on new code is named with both. Mutation caught: the report naming only the
    commit that wrote it (critical_batch_sweep's trials ran over six commits unsaid)."""
    a, b = "a" * 40, "b" * 40 + "+dirty.12345678"
    same = [_trial("mfd", s, [(10, 5.0)]) for s in range(2)]
    for t in same:
        t.code_versions = (a,)
    assert code_line(same) == "- code that trained the trials: `aaaaaaa` (2 trials)"
    same[1].code_versions = (a, b)
    line = code_line(same)
    assert line.startswith("- **code differs between trials**: 2 versions, `aaaaaaa` (2 trials), "
                           "`bbbbbbb+dirty.12345678` (1 trial)"), line
    assert "`mfd-1` (aaaaaaa then bbbbbbb+dirty.12345678)" in line
