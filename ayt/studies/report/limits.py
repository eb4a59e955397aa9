"""The report's "What this study cannot conclude" section: the ways a study's design
limits what its numbers mean, checked on its own trials, each stated in one sentence.

A check is one function in `LIMITS` taking the `ReportContext` and returning its sentences
(none when the study is clear of it); a new check is one function and its entry there:

  still_falling        a group whose mean curve still drops more than FLAT_TOLERANCE over its last
                       TAIL_EVALS evaluations: its final FID is not where it converges, and a
                       longer budget may reorder the groups
  shared_lr_cosines    losses compared at one shared learning rate whose measured step cosines
                       with the pixel error (tangent diagnostics) differ: the same lr is a
                       different effective step for each, which the tuned protocol removes
  target_at_first_eval every trial that reached the target did so at its first evaluation:
                       times to the target (and speed-ups) are not resolved
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ayt.eval.metrics import MIN, direction, sign
from ayt.eval.tangent import COS, metric_key
from ayt.metrics import short
from ayt.studies.report.plots import mean_curve
from ayt.studies.report.section import ReportContext, Section, SectionOutput

TAIL_EVALS = 3            # the evaluations whose trend says whether a curve has flattened
FLAT_TOLERANCE = 0.05     # a mean FID falling more than 5% over them is still falling
COSINE_GAP = 0.10         # step cosines further apart than this are different effective steps
LOSS = "loss"             # the axis that names the loss
LR = "lr"


def still_falling(ctx: ReportContext) -> list[str]:
    falling = []
    for group in ctx.groups:
        members = [t for t in ctx.trials if t.group == group and not t.stopped_early]
        tail = [(s, v) for s, v in mean_curve(members, ctx.key) if math.isfinite(v)][-TAIL_EVALS:]
        if len(tail) < TAIL_EVALS:
            continue
        (s0, v0), (s1, v1) = tail[0], tail[-1]
        drop = sign(ctx.key) * (v0 - v1) / v0 if v0 > 0 else 0.0       # improvement, in the metric's direction
        if drop > FLAT_TOLERANCE:
            slope = np.polyfit([s for s, _ in tail], [v for _, v in tail], 1)[0]   # FID per iteration
            falling.append(f"{group.label or 'the study'} {v0:.1f} → {v1:.1f} ({slope * 100:+.3g} per 100 "
                           f"iterations over iterations {s0}–{s1})")
    if not falling:
        return []
    moved = "fell" if direction(ctx.key) == MIN else "rose"
    return [f"- **Still {'falling' if moved == 'fell' else 'rising'} at the end of the budget** ({len(falling)} of "
            f"{len(ctx.groups)} groups; mean {short(ctx.key)} over the last {TAIL_EVALS} evaluations {moved} more "
            f"than {FLAT_TOLERANCE:.0%}): "
            + "; ".join(falling) + ". Their final values are not where they converge; a longer budget "
            "(`study.budget.amount`) may change the comparison."]


def shared_lr_cosines(ctx: ReportContext) -> list[str]:
    study = ctx.plan.study
    losses = {t.axes.get(LOSS) for t in ctx.trials} - {None}
    if len(losses) < 2 or study.get("tuned") or LR in {a.key for a in ctx.plan.space.axes}:
        return []
    key = metric_key(COS)
    cosines = {}
    for loss in sorted(losses):
        last = [t.curves[key][-1][1] for t in ctx.trials if t.axes.get(LOSS) == loss and t.curves.get(key)]
        if last:
            cosines[loss] = float(np.mean(last))
    if len(cosines) < 2 or max(cosines.values()) - min(cosines.values()) <= COSINE_GAP:
        return []
    measured = ", ".join(f"{loss} {c:.2f}" for loss, c in cosines.items())
    return [f"- **One shared learning rate for losses that step differently:** the losses' mean step cosine "
            f"with the pixel error at the last evaluation differs ({measured}; tangent diagnostics), so one lr "
            "is a different effective step for each and the comparison mixes step size with the loss. The "
            "tune-then-repeat protocol (`study.protocol.name=tune_then_repeat`, e.g. the `speed_tuned` study) "
            "compares each loss at its own tuned lr."]


def target_at_first_eval(ctx: ReportContext) -> list[str]:
    reached = []
    for t in ctx.trials:
        target = ctx.targets.get(t.group)
        curve = t.curves.get(ctx.key, [])
        if target is not None and curve:
            at = t.first_reaching(ctx.key, target)
            if at is not None:
                reached.append(at == curve[0][0])
    if len(reached) >= 2 and all(reached):
        return [f"- **Times to the target are not resolved:** all {len(reached)} trials that reached the target "
                "did so at their first evaluation, so images to the target and speed-ups (1.00×) measure the "
                "evaluation interval, not the training. Evaluate earlier (`study.budget.evals`) or set a "
                "stricter target (`study.target.fid`)."]
    return []


LIMITS: list[Callable[[ReportContext], list[str]]] = [still_falling, shared_lr_cosines, target_at_first_eval]


class Limits(Section):
    """What the study's design keeps it from concluding, found on its own trials."""

    def write(self, ctx: ReportContext) -> SectionOutput:
        found = [line for check in LIMITS for line in check(ctx)]
        if not found:
            return SectionOutput()
        return SectionOutput(["## What this study cannot conclude", "", *found, ""],
                             records={"limits": [line.lstrip("- ") for line in found]})
