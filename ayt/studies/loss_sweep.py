"""`python -m ayt.studies.loss_sweep`: pseudo-Huber, L2, L1, MFD and LPIPS at one batch size
(search space: conf/study/loss_sweep.yaml). LPIPS runs only where its VGG weights exist
(`loss.vgg_weights`, `loss.lin_weights`); otherwise the study drops it and says why."""

import dataclasses
import logging
import sys

from ayt.errors import ConfigError
from ayt.studies.engine.cli import study_main
from ayt.studies.engine.plan import StudyPlan, study_hook


@study_hook("loss_sweep")
def skip_lpips_without_weights(plan: StudyPlan) -> None:
    for i, axis in enumerate(plan.space.axes):
        if axis.key != "loss" or "lpips" not in (axis.values or ()):
            continue
        try:
            plan.trial_config({**{a.param: a.corners()[0] for a in plan.space.all_axes}, axis.param: "lpips"})
        except ConfigError as err:
            if not err.field.startswith("loss."):
                raise
            values = tuple(v for v in axis.values if v != "lpips")
            if not values:
                raise ConfigError("study.axes.loss", f"lpips was the only loss and cannot run: {err}") from None
            plan.space.axes[i] = dataclasses.replace(axis, values=values)
            plan.skipped.append(f"lpips skipped: {err}")
            logging.getLogger(__name__).warning("loss_sweep: lpips skipped: %s", err)


if __name__ == "__main__":
    sys.exit(study_main("loss_sweep"))
