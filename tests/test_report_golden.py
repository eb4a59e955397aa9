"""The study report regenerated from a fixed set of synthetic trials is the committed one
(tests/golden/report/<case>/), line for line, except for what says when, where and by which
code it was written. Pins the whole report (report.md, trials.csv, curves.csv, groups.csv,
tangent.csv and which files are written) so it can be restructured without changing it.

The trials are what `ayt.studies.engine.tracker` writes, put straight into a real sqlite MLflow store
(no Ray): a parent run and one child per trial with its params (`axis.*`, `batch_size`, `seed`,
`artifact.*`), tags (`mlflow.parentRunId`, `ayt.code_versions`, `ayt.stopped_early`,
`ayt.failure`) and metric histories (FIDs, tangent diagnostics, noise scale and its
companions, the `_vs_images` copies of all but the tangent ones, `train/loss`, `time/*`),
drawn from seeded numpy. The plans are the real ones (`plan_study`). Two cases:

  critical_batch  critical_batch_sweep at 3 batch sizes x 2 lr rules x 2 losses x 3 seeds, with
                  tangent and noise-scale histories, one trial failed on a non-finite loss and
                  one whose FID rose: the critical-batch section with its lr-rule table, the
                  noise-scale column, the diverged list, the per-group settings (`study.tuned`)
                  and Welch/paired comparisons with the reference loss;
  batch_size      batch_size_sweep (one seed, no diagnostics): feature-map and converged-start
                  artifact columns, a trial stopped early, trials trained on two code versions,
                  nothing testable against the reference, the critical batch not computed.

Masked (they differ on every run): the study config hash (it hashes the whole base config,
which any new config default changes), the report's commit line, machine and time line, and
the study wall-clock. Figures are drawn but not rendered (`savefig` writes an empty file: the
PNGs are not compared, only that they are written) and the plan skips building every trial's
config (the report reads none of them): together they took most of the test's time.
`AYT_REGENERATE_GOLDEN=1` rewrites the golden files instead of comparing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "report"
REGENERATE = os.environ.get("AYT_REGENERATE_GOLDEN") == "1"
TEXT_FILES = ("report.md", "trials.csv", "curves.csv", "groups.csv", "tangent.csv")
CODE = ("1111111111111111111111111111111111111111", "2222222222222222222222222222222222222222+dirty.0badc0de")
START_MS = 1_700_000_000_000          # the parent run's start (the wall-clock line is masked anyway)
BINS = 2                              # tangent t-bins (fewer than the default 4: fewer histories to store)

CASES = {
    "critical_batch": ("critical_batch_sweep", ["study.axes.batch_size=[8,16,32]", "study.axes.lr_scaling=[none,linear]"]),
    "batch_size": ("batch_size_sweep", []),
}

MASKS = [
    (re.compile(r"^(# Study `[^`]*` \(.*-)[0-9a-f]{8}(\))$"), r"\1<hash>\2"),
    (re.compile(r"^- report written by commit .*$"), "- report written by commit <commit>; study config hash: <hash>"),
    (re.compile(r"^- machine: .*$"), "- machine: <machine>; written <time>"),
    (re.compile(r"study wall-clock [\d.]+ min"), "study wall-clock <minutes> min"),
]


def _masked(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        for pattern, replacement in MASKS:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return lines


def _evaluations(plan, batch: int) -> list[int]:
    """The iterations a trial of `plan` at `batch` evaluates at (evenly over its budget)."""
    space = plan.space
    total = space.budget_amount if space.budget_unit == "iterations" else space.budget_amount // batch
    return [round(total * (i + 1) / space.evals) for i in range(space.evals)]


def _metrics(rng, case: str, axes: dict, batch: int, steps: list[int]) -> dict[str, list[tuple[int, float]]]:
    """Synthetic histories of one trial: FID falling like S_B/(s + S_B) with S_B = S_min(1 + B_noise/B)
    (so the critical batch fit has something to find), and, in the critical_batch case, tangent
    diagnostics and the noise scale with its two estimates."""
    loss, seed = axes["loss"], int(axes["seed"])
    b_noise, s_min = {"pseudo_huber": (20.0, 90.0), "mfd": (40.0, 40.0)}[loss]
    rule = {"none": 1.0, "sqrt": 0.9, "linear": 0.8}[axes.get("lr_scaling", "none")]
    scale = s_min * (1 + b_noise / batch) * rule * (1 + 0.03 * (seed - 1)) * (1.0 if case == "critical_batch" else 8.0)
    out: dict[str, list[tuple[int, float]]] = {}
    for key, floor in (("eval/fid_1step", 20.0), ("eval/fid_2step", 15.0)):
        out[key] = [(s, round(floor + 200.0 * scale / (s + scale) * float(rng.lognormal(0, 0.02)), 4)) for s in steps]
    out["train/loss"] = [(s, round(0.5 * scale / (s + scale) + 0.01 * float(rng.random()), 5))
                         for s in range(10, steps[-1] + 1, max(1, steps[-1] // 12))]
    if case != "critical_batch":
        return out
    g2 = [(s, round(1e-3 * (1 + 2 * scale / (s + scale)), 7)) for s in steps]
    noise = [(s, round(b_noise * (1 + s / 600) * float(rng.lognormal(0, 0.05)), 4)) for s in steps]
    out["eval/grad_sq_norm"] = g2
    out["eval/noise_scale"] = noise
    out["eval/grad_trace_cov"] = [(s, round(v * g, 9)) for (s, v), (_, g) in zip(noise, g2)]
    for b in range(BINS):
        out[f"eval/tangent/cos_t{b}"] = [(s, round(0.2 + 0.1 * b + 0.3 * s / steps[-1] + 0.02 * float(rng.normal()), 4))
                                         for s in steps]
        out[f"eval/tangent/err_t{b}"] = [(s, round((0.05 + 0.1 * b) * scale / (s + scale), 5)) for s in steps]
        out[f"eval/tangent/dist_t{b}"] = [(s, round(0.5 + b + 0.01 * float(rng.normal()), 4)) for s in steps]
        out[f"eval/tangent/osc_t{b}"] = [(s, round(0.9 - 0.05 * b + 0.01 * float(rng.normal()), 4)) for s in steps[1:]]
    for kind in ("cos", "err", "dist", "osc"):
        per_bin = [dict(out[f"eval/tangent/{kind}_t{b}"]) for b in range(BINS)]
        out[f"eval/tangent/{kind}_all"] = [(s, round(float(np.mean([c[s] for c in per_bin])), 5))
                                           for s in steps if all(s in c for c in per_bin)]
    return out


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for both cases (creating its tables is a good part of the cost)."""
    return f"sqlite:///{tmp_path_factory.mktemp('golden-mlflow') / 'mlflow.db'}"


def _store(uri: str, tmp_path: Path, case: str, plan) -> str:
    """The study's parent run and its trials in the store at `uri`, as the tracker writes them;
    returns the parent's run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"{case}-{plan.name}", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment, start_time=START_MS, run_name=plan.study_id,
                               tags={"ayt.study": plan.name}).info.run_id
    rng = np.random.default_rng(12345)
    for index, params in enumerate(plan.space.grid()):
        batch = int(params.get("batch_size", plan.base.batch_size))
        axes = {k.replace("__", "."): str(v) for k, v in params.items()}
        trial_id = f"{index:05d}"
        steps = _evaluations(plan, batch)
        status, stopped, failure = "FINISHED", False, None
        if case == "critical_batch" and (axes["loss"], axes["lr_scaling"], batch, axes["seed"]) == ("mfd", "linear", 32, "2"):
            steps, status = steps[:2], "FAILED"          # a non-finite loss after its second evaluation
            failure = "NonFiniteLossError: non-finite loss at iteration 120: loss=nan"
        if case == "batch_size" and (axes["loss"], batch) == ("mfd", 128):
            steps, status, stopped = steps[:2], "KILLED", True     # stopped early (ASHA)
        histories = _metrics(rng, case, axes, batch, steps)
        if case == "critical_batch" and (axes["loss"], axes["lr_scaling"], batch, axes["seed"]) == ("pseudo_huber", "linear", 32, "1"):
            first = histories["eval/fid_1step"][0][1]             # diverged: rose and stayed up
            histories["eval/fid_1step"] = [(s, round(first * (1.0 if i == 0 else 1.2 + 0.05 * i), 4))
                                           for i, (s, _) in enumerate(histories["eval/fid_1step"])]
        artifacts = {"fid_extractor": "classifier", "fid_classifier_hash": "c1a55f1e",
                     "fid_classifier_test_accuracy": "0.9812"}
        if case == "batch_size":
            artifacts.update({"converged_fid_1step": "61.25", "converged_fid_2step": "58.5"})
            if axes["loss"] == "mfd":
                artifacts.update({"feature_map_label_mse": "0.0123", "feature_map_r2": "0.91",
                                  "feature_map_r2_geo": "0.93", "feature_map_r2_clr": "0.88", "feature_map_r2_deg": "0.9",
                                  "feature_map_train_images": "60000",
                                  **{f"feature_map_align_{e}": f"{0.1 * i + 0.05:.2f}"
                                     for i, e in enumerate(("noise", "blur", "mixup", "shift", "mean"))}})
        code = CODE[:2] if case == "batch_size" and index == 1 else (CODE[1],) if case == "batch_size" and index > 4 else CODE[:1]
        tags = {"mlflow.parentRunId": parent, "ayt.study": plan.name, "ayt.study_id": plan.study_id,
                "ayt.trial_id": trial_id, "ayt.entry": "ayt.studies", "ayt.code_versions": ",".join(code),
                "ayt.stopped_early": str(stopped).lower(), "ayt.final_iteration": str(steps[-1] if steps else 0)}
        if failure:
            tags["ayt.failure"] = failure
        run = client.create_run(experiment, start_time=START_MS + index, run_name=plan.space.label(params, trial_id),
                                tags=tags).info.run_id
        run_params = {"batch_size": batch, "seed": axes["seed"], "lr": 1e-3, "loss": axes["loss"],
                      **{f"axis.{k}": v for k, v in params.items()}, **{f"artifact.{k}": v for k, v in artifacts.items()}}
        metrics = [Metric(k, v, START_MS, s) for k, curve in histories.items() for s, v in curve]
        metrics += [Metric(k + "_vs_images", v, START_MS, s * batch) for k, curve in histories.items()
                    if k.startswith("eval/") and not k.startswith("eval/tangent/") for s, v in curve]
        metrics += [Metric("time/train_seconds", 3.0 * i * batch / 16, START_MS, s) for i, s in enumerate(steps, 1)]
        metrics += [Metric("time/eval_seconds", 1.5 * i, START_MS, s) for i, s in enumerate(steps, 1)]
        client.log_batch(run, params=[Param(k, str(v)) for k, v in run_params.items()])
        for start in range(0, len(metrics), 900):
            client.log_batch(run, metrics=metrics[start:start + 900])
        client.set_terminated(run, status, end_time=START_MS + 10_000)
    return parent


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_is_the_golden_one(tmp_path, monkeypatch, mlflow_uri, case):
    """Mutations caught: any change to what the report writes from the same trials (a section
    moved, a column lost or renamed, a number rounded otherwise, a file no longer written)."""
    import matplotlib.figure

    from ayt.studies.report.write import write_report
    from ayt.studies.runner import StudyPlan, plan_study
    monkeypatch.setattr(StudyPlan, "trial_config", lambda self, params, trial_id=None: self.base)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, *a, **k: Path(path).write_bytes(b""))
    name, overrides = CASES[case]
    plan = plan_study(name, [f"out_dir={tmp_path / 'out'}", *overrides])
    uri, parent = mlflow_uri, _store(mlflow_uri, tmp_path, case, plan)
    summary = write_report(plan, uri, parent)
    out = Path(plan.out_dir)
    written = {Path(f).name for f in summary["files"]}
    listing = [f"trials: {summary['trials']}", *sorted(written)]
    golden = GOLDEN / case
    texts = {"files.txt": listing, **{f: _masked((out / f).read_text()) for f in TEXT_FILES if (out / f).is_file()}}
    if REGENERATE:
        golden.mkdir(parents=True, exist_ok=True)
        for old in golden.iterdir():
            old.unlink()
        for f, lines in texts.items():
            (golden / f).write_text("\n".join(lines) + "\n")
        pytest.skip(f"regenerated {golden}")
    expected = sorted(p.name for p in golden.iterdir())
    assert sorted(texts) == expected, f"{case}: the report wrote {sorted(texts)}, the golden set is {expected}"
    for f, lines in texts.items():
        want = (golden / f).read_text().splitlines()
        for number, (got, exp) in enumerate(zip(lines, want), 1):
            assert got == exp, f"{case}/{f} line {number} differs:\n  got:      {got}\n  expected: {exp}"
        assert len(lines) == len(want), f"{case}/{f}: {len(lines)} lines, golden has {len(want)}"
