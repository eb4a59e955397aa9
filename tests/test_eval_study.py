"""A smoke study that evaluates KID and precision/recall besides FID and ranks by recall (higher
is better): the new metrics reach MLflow, curves.csv and the report without a list edited
anywhere (a real local Ray, a sqlite MLflow store); the report reads recall as higher-is-better.

Mutations caught: a hand-kept metric list back in the tracker, the report's curves or table
(KID/recall missing from curves.csv or the table); the loop logging only FID keys."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from ayt.studies.runner import study_main

# A trial whose artifacts build in seconds: no pretrained start, no feature map (pseudo-Huber),
# a 20-iteration classifier as the extractor.
FAST = ["study.preset=smoke", "training.init=scratch", "fid.classifier.iterations=20", "fid.num_samples=40",
        "fid.batch_size=20", "progress=false", "cpu_threads=1"]


def test_kid_and_precision_recall_reach_mlflow_curves_and_the_report(ray_session, tmp_path):
    code = study_main("batch_size_sweep", [
        f"out_dir={tmp_path}", "study.name=metrics", "study.axes.batch_size=[16]", "study.axes.loss=[pseudo_huber]",
        "study.seeds=[0]", "study.budget.amount=320", "study.budget.evals=2", "study.metric=recall_1step",
        "eval.metrics=[fid,kid,prc]", "eval.kid.subsets=5", *FAST])
    assert code == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("metrics")
    child = next(r for r in client.search_runs([experiment.experiment_id])
                 if "mlflow.parentRunId" in r.data.tags)
    for key in ("eval/fid_1step", "eval/kid_2step", "eval/precision_1step", "eval/recall_2step"):
        assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [10, 20], key
    out = tmp_path / "metrics"
    header = (out / "curves.csv").read_text().splitlines()[0].split(",")
    assert {"fid_1step", "kid_1step", "kid_2step", "precision_1step", "recall_2step"} <= set(header)
    report = (out / "report.md").read_text()
    assert "final KID 1-step" in report and "final recall 2-step" in report and "best recall 1-step" in report
    assert any(line.startswith("- Highest ") and "recall_1step" in line for line in report.splitlines())
    assert (out / "kid_1step.png").is_file() and (out / "recall_1step.png").is_file()
