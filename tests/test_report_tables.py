"""The report's first table fits a screen: group, seeds, the final value at each sampler and the
verdict against the reference with its interval (at most 7 columns, whatever the trials
carry); the feature-map, start, target and per-test columns follow in tables of their own and
every one of them stays in groups.csv. Constructed trials, no MLflow, no Ray."""

from __future__ import annotations

import csv

from ayt.metrics import FID_1STEP, FID_2STEP
from ayt.studies.report.rows import write_rows
from ayt.studies.report.table import group_rows, table_lines, targets
from ayt.studies.engine.trials import Trial

STUDY = {"target": {"fid": None, "reference": {"loss": "pseudo_huber"}}}
ARTIFACTS = {"feature_map_label_mse": "0.0123", "feature_map_r2": "0.9", "feature_map_train_images": "60000",
             **{f"feature_map_r2_{f}": "0.9" for f in ("geo", "clr", "deg")},
             **{f"feature_map_align_{e}": "0.2" for e in ("noise", "blur", "mixup", "shift", "mean")},
             "converged_fid_1step": "61.0", "converged_fid_2step": "58.5"}


def _trial(loss: str, seed: int, batch: int) -> Trial:
    final = 100.0 - (10 + 0.5 * seed) * (loss == "mfd") + seed + batch / 16
    curve = [(100, final + 20.0), (200, final)]
    return Trial(run_id=f"{loss}{seed}{batch}", name=f"{loss}-{seed}-{batch}",
                 axes={"batch_size": str(batch), "loss": loss, "seed": str(seed)}, batch_size=batch,
                 status="FINISHED", stopped_early=False, curves={FID_1STEP: curve, FID_2STEP: curve},
                 train_seconds=1.0, artifacts=ARTIFACTS if loss == "mfd" else {})


def _tables(lines: list[str]) -> list[list[str]]:
    """Each markdown table's header cells, in order."""
    return [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines)
            if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---")]


def test_the_first_table_fits_a_screen_and_the_rest_follows_and_stays_in_groups_csv(tmp_path):
    """8 groups (4 batch sizes x 2 losses, 3 seeds) with feature-map and start columns, a
    target and both comparisons: 18 columns in one table before. Mutation caught: the
    feature-map or target columns back in the first table."""
    trials = [_trial(loss, seed, batch) for batch in (16, 32, 64, 128) for loss in ("pseudo_huber", "mfd")
              for seed in range(3)]
    rows = group_rows(trials, targets(trials, STUDY, FID_1STEP), FID_1STEP, STUDY)
    assert len(rows) == 8
    first, *rest = _tables(table_lines(rows, FID_1STEP))
    assert len(first) <= 7, first
    assert first[:4] == ["group", "seeds", "final FID 1-step", "final FID 2-step"] and "vs reference" in first[-1]
    later = [header for table in rest for header in table]
    for words in ("feature-map label MSE", "MFD step cosine", "start FID", "target FID", "best FID 1-step",
                  "paired by seed"):
        assert not any(words in h for h in first) and any(words in h for h in later), words
    cells = [line for line in table_lines(rows, FID_1STEP) if line.startswith("| batch_size=16, loss=mfd |")]
    assert cells[0].endswith(" | better: -10.5 [-11.7, -9.26] (paired t, n=3) |"), cells[0]    # interval, test
    with open(write_rows(rows, tmp_path / "groups.csv"), newline="") as f:
        header = next(csv.reader(f))
    assert {"feature_map_label_mse", "converged_fid_1step", "target_fid", "paired_vs_reference"} <= set(header)
