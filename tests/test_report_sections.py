"""The report's open ends: a metric a trial logs under `eval/…` or `train/…` reaches
the loaded trials and curves.csv with no list edited; a new report section is one class; one
group type; one seeds-plus-mean helper.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ayt.metrics import FID_1STEP, LOSS
from ayt.studies.engine.group import Group
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.engine.trials import Trial

NEW_EVAL, NEW_TRAIN = "eval/new_probe", "train/new_term"       # names nothing in ayt knows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with a study of 2 losses x 2 seeds, logged as the tracker logs:
    FID, a new eval metric (with its `_vs_images` copy), the loss and a new loss term."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    root = tmp_path_factory.mktemp("sections")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sections", artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment, run_name="demo").info.run_id
    for loss in ("mfd", "pseudo_huber"):
        for seed in (0, 1):
            run = client.create_run(experiment, run_name=f"{loss}-s{seed}",
                                    tags={"mlflow.parentRunId": parent}).info.run_id
            for key, value in (("axis.loss", loss), ("axis.seed", str(seed)), ("batch_size", "16")):
                client.log_param(run, key, value)
            metrics = []
            for step in (10, 20, 30):
                metrics += [Metric(FID_1STEP, 100.0 / step + seed, 0, step), Metric(NEW_EVAL, step / 10, 0, step),
                            Metric(NEW_EVAL + "_vs_images", step / 10, 0, step * 16)]
            metrics += [Metric(LOSS, 1.0 / step, 0, step) for step in range(5, 31, 5)]
            metrics += [Metric(NEW_TRAIN, 2.0 / step, 0, step) for step in range(5, 31, 5)]
            client.log_batch(run, metrics=metrics)
            client.set_terminated(run, "FINISHED")
    return uri, parent


def test_a_new_eval_and_train_metric_reach_the_trials_and_curves_csv(store, tmp_path):
    """Mutations caught: load_trials fetching a named list of histories (the FIDs, tangent and
    noise scale, as it once did), curves.csv naming its columns, the `_vs_images` copies (step =
    images seen) loaded as if step were the iteration."""
    from ayt.studies.report.write import _write_curves_csv
    from ayt.studies.engine.trials import load_trials
    trials = load_trials(*store)
    assert [t.name for t in trials] == ["mfd-s0", "mfd-s1", "pseudo_huber-s0", "pseudo_huber-s1"]
    first = trials[0]
    assert first.curves[NEW_EVAL] == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert [s for s, _ in first.curves[NEW_TRAIN]] == [5, 10, 15, 20, 25, 30]
    assert not any(k.endswith("_vs_images") for k in first.curves)
    lines = Path(_write_curves_csv(trials, tmp_path / "curves.csv")).read_text().splitlines()
    assert lines[0] == "run,axis.loss,axis.seed,iteration,images_seen,fid_1step,new_probe"   # eval/* only
    assert lines[1] == "mfd-s0,mfd,0,10,160,10.0,1.0" and len(lines) == 1 + 4 * 3


class LossCurves(Section):
    """The example in ayt/studies/report/section.py: train/loss per group."""

    def applies(self, ctx):
        return any(t.curves.get(LOSS) for t in ctx.trials)

    def write(self, ctx):
        from ayt.studies.report.plots import curve_figure
        path = curve_figure(ctx.trials, LOSS, ctx.out / "loss.png", title=f"{ctx.plan.name}: train/loss", ylabel="loss")
        return SectionOutput(files=[path])


class NewProbe(Section):
    """A markdown section with a record: the mean last value of the new metric per group."""

    def write(self, ctx):
        means = {g.label: sum(t.final(NEW_EVAL) for t in ctx.trials if t.group == g) / 2 for g in ctx.groups}
        return SectionOutput(["", "## New probe", ""] + [f"- {g}: {m:.2f}" for g, m in means.items()],
                             records={"new_probe": means})


class Never(Section):
    def applies(self, ctx):
        return False

    def write(self, ctx):
        raise AssertionError("a section that does not apply is not written")


def test_a_new_section_is_one_class_in_the_list(store, tmp_path):
    """Mutations caught: write_report calling sections by name (a new one needing a call site),
    a section that does not apply being written, its records not reaching the summary, a figure
    of a section before Figures not listed there (or listed twice when it shows it itself)."""
    from ayt.studies.report.write import Data, Figures, write_report
    plan = SimpleNamespace(name="demo", out_dir=tmp_path / "demo", metric=FID_1STEP, study={"target": {}})
    summary = write_report(plan, *store, sections=[NewProbe(), Never(), LossCurves(), Figures(), Data()])
    text = Path(summary["report"]).read_text()
    assert text.startswith("\n## New probe\n\n- loss=mfd: 3.00\n- loss=pseudo_huber: 3.00\n")
    assert summary["new_probe"] == {"loss=mfd": 3.0, "loss=pseudo_huber": 3.0} and summary["trials"] == 4
    assert "![loss.png](loss.png)" in text.split("## Figures")[1] and text.count("![loss.png]") == 1
    names = sorted(Path(f).name for f in summary["files"])
    # one curve figure per evaluation curve the trials logged (they log no 2-step FID)
    assert names == ["curves.csv", "fid_1step.png", "loss.png", "report.md", "trials.csv"]
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 0


def test_group_is_its_label_and_is_taken_apart_without_strings():
    """Mutations caught: a label joined otherwise than the report prints it, a group not found by
    its label (critical batch fits are read as fits["loss=mfd"]), sorting other than by label
    (the order of every series table), `without`/`replace` dropping the axis order."""
    g = Group.of({"batch_size": 16, "loss": "mfd", "lr_scaling": "sqrt"})
    assert g.label == str(g) == "batch_size=16, loss=mfd, lr_scaling=sqrt" and g.joined(",").count(",") == 2
    assert g.without("batch_size") == "loss=mfd, lr_scaling=sqrt" and Group().label == "all"
    assert g.without("batch_size", "loss", "lr_scaling") == "all"
    assert g.replace({"loss": "pseudo_huber", "seed": 3}).pairs == (("batch_size", "16"), ("loss", "pseudo_huber"),
                                                                     ("lr_scaling", "sqrt"))
    assert g.part("lr_scaling") == "lr_scaling=sqrt" and g.part("seed") == "" and g.get("seed") is None
    assert g.matches({"loss": "mfd"}) and not g.matches({"loss": "mfd", "batch_size": "8"})
    table = {g.without("batch_size"): 1.0}
    assert table["loss=mfd, lr_scaling=sqrt"] == 1.0 and Group.of([("loss", "mfd"), ("lr_scaling", "sqrt")]) in table
    groups = [Group.of({"batch_size": b}) for b in (8, 16, 128)]
    assert sorted(groups) == ["batch_size=128", "batch_size=16", "batch_size=8"]       # as labels sort
    assert sorted(groups, key=Group.sort_key) == groups                                # numerically
    trial = Trial("r", "n", {"batch_size": "16", "loss": "mfd", "seed": "0"}, 16, "FINISHED", False)
    assert trial.group == "batch_size=16, loss=mfd" and list(trial.group) == [("batch_size", "16"), ("loss", "mfd")]


def test_seeds_and_mean_draws_each_seed_thin_and_their_mean_at_shared_evaluations():
    """Mutations caught: the mean taken over evaluations only some seeds have, x in iterations
    instead of images seen, thin lines drawn when the caller asked for the mean only."""
    from ayt.studies.report.plots import pyplot, seeds_and_mean
    plt = pyplot()
    trials = [Trial("a", "a", {"seed": "0"}, 8, "FINISHED", False, {FID_1STEP: [(10, 4.0), (20, 2.0)]}),
              Trial("b", "b", {"seed": "1"}, 8, "FINISHED", False, {FID_1STEP: [(10, 6.0), (20, 4.0), (30, 1.0)]}),
              Trial("c", "c", {"seed": "2"}, 8, "FINISHED", False, {})]
    fig, ax = plt.subplots()
    seeds_and_mean(ax, trials, FID_1STEP, {"color": "red"}, "mean")
    thin_a, thin_b, mean = ax.lines
    assert list(thin_a.get_xdata()) == [80, 160] and thin_a.get_linewidth() == 0.8
    assert list(mean.get_xdata()) == [80, 160] and list(mean.get_ydata()) == [5.0, 3.0] and mean.get_label() == "mean"
    ax.clear()
    seeds_and_mean(ax, trials, FID_1STEP, seeds=False, linewidth=1)
    assert len(ax.lines) == 1 and ax.lines[0].get_linewidth() == 1
    seeds_and_mean(ax, trials[2:], FID_1STEP)          # no trial has the history: nothing drawn
    assert len(ax.lines) == 1
    plt.close(fig)


def test_report_context_shares_targets_and_rows_between_sections():
    """Mutation caught: each section recomputing the group table (the findings computed from
    other rows than the table shows)."""
    trials = [Trial(f"{loss}{s}", f"{loss}-{s}", {"loss": loss, "seed": str(s)}, 16, "FINISHED", False,
                    {FID_1STEP: [(10, 20.0 + s + (loss == "mfd"))]}) for loss in ("mfd", "pseudo_huber") for s in (0, 1)]
    plan = SimpleNamespace(metric=FID_1STEP, study={"target": {"fid": 21.0}})
    ctx = ReportContext(plan, trials, Path("."))
    assert ctx.rows is ctx.rows and ctx.targets == {"loss=mfd": 21.0, "loss=pseudo_huber": 21.0}
    assert [r["group"] for r in ctx.rows] == ["loss=mfd", "loss=pseudo_huber"] and ctx.groups == ["loss=mfd",
                                                                                                   "loss=pseudo_huber"]
