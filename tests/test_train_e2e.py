"""The whole pipeline through `python -m ayt.train`: artifacts -> training -> MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ayt.train import main


def _runs(out_dir, experiment="ayt"):
    client = MlflowClient(f"sqlite:///{out_dir}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="session")
def smoke_run(shared_out_dir):
    """One `experiment=smoke` run on the plain loop; later tests reuse its cached artifacts."""
    code = main(["experiment=smoke", f"out_dir={shared_out_dir}", "scaling.backend=local", "name=smoke-local"])
    return code, shared_out_dir


def test_smoke_run_logs_fid_curve_params_and_artifacts(smoke_run):
    code, out = smoke_run
    assert code == 0
    client, runs = _runs(out)
    run = next(r for r in runs if r.data.tags.get("ayt.run_name") == "smoke-local")
    assert run.info.status == "FINISHED"
    for key, value in {"batch_size": "32", "loss": "mfd", "seed": "0", "lr": "0.002", "dataset": "digits"}.items():
        assert run.data.params[key] == value
    assert "huber_c" in run.data.params and "network.model_channels" in run.data.params
    for key in ("fid_1step", "fid_2step"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [50, 100, 150]
        assert all(0 < m.value < 1e5 for m in history)
    seen = client.get_metric_history(run.info.run_id, "images_seen")
    assert all(m.value == m.step * 32 for m in seen) and seen
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples_1step.png", "samples_2step.png", "fid_curve.png", "ema.pt"} <= artifacts
    # Artifacts live under out_dir, not in ./mlruns of whatever directory the process ran in.
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())
    metrics = run.data.metrics
    assert metrics["fid_classifier_test_accuracy"] > 0.9
    assert metrics["feature_map_label_mse"] < metrics["feature_map_zero_mse"]


def test_rerun_with_same_name_resumes_without_new_run_or_duplicate_steps(smoke_run):
    _, out = smoke_run
    assert main(["experiment=smoke", f"out_dir={out}", "scaling.backend=local", "name=smoke-local"]) == 0
    client, runs = _runs(out)
    same = [r for r in runs if r.data.tags.get("ayt.run_name") == "smoke-local"]
    assert len(same) == 1
    steps = [m.step for m in client.get_metric_history(same[0].info.run_id, "fid_1step")]
    assert steps == [50, 100, 150]


def test_non_finite_loss_fails_the_run_with_iteration_and_reason(smoke_run, capsys):
    _, out = smoke_run
    code = main(["experiment=smoke", f"out_dir={out}", "scaling.backend=local", "name=diverge", "lr=1e30",
                 "training.log_every=1", "training.iterations=20", "training.eval_every=20",
                 "training.checkpoint_every=20"])
    assert code == 1
    assert "non-finite loss at iteration" in capsys.readouterr().err
    _, runs = _runs(out)
    run = next(r for r in runs if r.data.tags.get("ayt.run_name") == "diverge")
    assert run.info.status == "FAILED"
    assert "non-finite loss at iteration" in run.data.tags["ayt.failure"]
    assert int(run.data.tags["ayt.failed_iteration"]) < 20
