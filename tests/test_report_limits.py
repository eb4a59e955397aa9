"""The report's "What this study cannot conclude" section: each check fires on a
study that has the limit and stays quiet on one that does not, so deleting or inverting a check
fails here."""

from __future__ import annotations

from types import SimpleNamespace

from ayt.eval.tangent import COS, metric_key
from ayt.metrics import FID_1STEP
from ayt.studies.report.limits import Limits, shared_lr_cosines, still_falling, target_at_first_eval
from ayt.studies.report.section import ReportContext
from ayt.studies.engine.trials import Trial

COS_ALL = metric_key(COS)


def _trial(loss: str, seed: int, fids: list[float], cosine: float | None = None, steps=None) -> Trial:
    steps = steps or [100 * (i + 1) for i in range(len(fids))]
    curves = {FID_1STEP: list(zip(steps, fids))}
    if cosine is not None:
        curves[COS_ALL] = [(s, cosine) for s in steps]
    return Trial(run_id=f"{loss}{seed}", name=f"{loss}-s{seed}", axes={"loss": loss, "seed": str(seed)},
                 batch_size=16, status="FINISHED", stopped_early=False, curves=curves)


def _ctx(trials, tmp_path, axes=("loss",), **study) -> ReportContext:
    plan = SimpleNamespace(study={"target": {}, **study}, metric=FID_1STEP, name="demo",
                           space=SimpleNamespace(axes=[SimpleNamespace(key=k) for k in axes]))
    return ReportContext(plan=plan, trials=trials, out=tmp_path)


def test_a_curve_still_falling_at_the_end_is_named_and_a_flat_one_is_not(tmp_path):
    """Mutation caught: the tail taken from the first evaluations, or the drop's sign flipped."""
    falling = [_trial("mfd", s, [400, 300, 242, 210, 176]) for s in (0, 1)]
    flat = [_trial("pseudo_huber", s, [300, 150, 120, 119, 118]) for s in (0, 1)]
    lines = still_falling(_ctx(falling + flat, tmp_path))
    assert len(lines) == 1 and "1 of 2 groups" in lines[0]
    assert "loss=mfd 242.0 → 176.0" in lines[0] and "pseudo_huber" not in lines[0]
    assert "-33 per 100 iterations" in lines[0]
    assert still_falling(_ctx(flat, tmp_path)) == []


def test_losses_at_one_shared_lr_with_different_step_cosines_point_to_the_tuned_protocol(tmp_path):
    trials = [_trial("mfd", 0, [300, 200, 190], cosine=0.55), _trial("pseudo_huber", 0, [300, 150, 120], cosine=1.0)]
    lines = shared_lr_cosines(_ctx(trials, tmp_path))
    assert len(lines) == 1 and "mfd 0.55, pseudo_huber 1.00" in lines[0] and "tune_then_repeat" in lines[0]
    # tuned per loss, or the lr swept: the comparison is not at one shared lr
    assert shared_lr_cosines(_ctx(trials, tmp_path, tuned={"loss=mfd": {"lr": 2.5e-4}})) == []
    assert shared_lr_cosines(_ctx(trials, tmp_path, axes=("loss", "lr"))) == []
    same = [_trial("mfd", 0, [300, 200], cosine=0.97), _trial("pseudo_huber", 0, [300, 150], cosine=1.0)]
    assert shared_lr_cosines(_ctx(same, tmp_path)) == []                  # the same effective step
    assert shared_lr_cosines(_ctx([_trial("mfd", 0, [300, 200]), _trial("l2", 0, [300, 150])], tmp_path)) == []


def test_a_target_every_trial_reached_at_its_first_evaluation_is_not_resolved(tmp_path):
    early = [_trial("mfd", s, [10, 9, 9.5]) for s in (0, 1)]
    lines = target_at_first_eval(_ctx(early, tmp_path, target={"fid": 12.0}))
    assert len(lines) == 1 and "first evaluation" in lines[0]
    assert target_at_first_eval(_ctx(early, tmp_path, target={"fid": 9.2})) == []


def test_the_section_is_empty_when_nothing_limits_the_study(tmp_path):
    flat = [_trial("pseudo_huber", s, [300, 150, 120, 119, 118]) for s in (0, 1)]
    assert Limits().write(_ctx(flat, tmp_path)).lines == []
    out = Limits().write(_ctx([_trial("mfd", 0, [400, 300, 200])], tmp_path))
    assert out.lines[0] == "## What this study cannot conclude" and len(out.records["limits"]) == 1
