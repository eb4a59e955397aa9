"""The metric-name convention every part of the pipeline shares.

A numeric metric is namespaced by what produced it: ``train/…`` (what the step returns:
the loss and any term a loss adds), ``eval/…`` (what a probe measures on the EMA model at an
evaluation: FIDs, diagnostics), ``time/…`` (seconds spent training and evaluating). Two
counters are plain: ``iteration`` and ``images_seen``. Anything that follows the convention
reaches MLflow, Ray Tune and the study report without a list to edit; anything else in a
Tune result (Tune's own bookkeeping) does not.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

TRAIN, EVAL, TIME = "train/", "eval/", "time/"
NAMESPACES = (TRAIN, EVAL, TIME)
COUNTERS = ("images_seen",)

FID_1STEP, FID_2STEP = "eval/fid_1step", "eval/fid_2step"
FID_KEYS = (FID_1STEP, FID_2STEP)
LOSS = "train/loss"
TRAIN_SECONDS, EVAL_SECONDS = "time/train_seconds", "time/eval_seconds"
HISTORY = "history"        # [[step, {key: value}], ...]: metrics logged between two reports
VS_IMAGES = "_vs_images"   # suffix of an eval curve re-logged with step = images seen


def is_metric(key: str) -> bool:
    return key.startswith(NAMESPACES) or key in COUNTERS


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a result dict that follow the convention."""
    return {k: float(v) for k, v in result.items()
            if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def eval_key(name: str) -> str:
    """`fid_1step` (how configs name a study metric) -> `eval/fid_1step`."""
    return name if name.startswith(EVAL) else EVAL + name


def short(key: str) -> str:
    """`eval/fid_1step` -> `fid_1step` (CSV columns and plot labels)."""
    return key.split("/", 1)[-1]
