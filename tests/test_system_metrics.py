"""MLflow's own system metrics (tracking.system_metrics): on CPU, the CPU and memory metrics a
run and a study trial log from the process that trains, and none when the switch is off.
The GPU metrics come from the same monitor through pynvml (the gpu extra), on a GPU node."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from ayt.studies.runner import study_main
from ayt.train import main

CPU_KEYS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage")
# Short runs: a sample every half second, so each run has several.
ON = ["tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.5"]
TINY_RUN = ["experiment=smoke", "progress=false", "training.init=scratch", "loss=pseudo_huber",
            "training.iterations=20", "training.eval_every=20", "training.checkpoint_every=20",
            "fid.num_samples=50", "diagnostics.tangent.enabled=false"]


def _runs(out, experiment: str):
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_a_run_logs_cpu_and_memory_system_metrics_when_asked(shared_out_dir):
    """Mutation caught: the plain loop not wrapped in `system_metrics` (nothing under system/)."""
    args = [*TINY_RUN, f"out_dir={shared_out_dir}", "tracking.experiment=system-metrics"]
    assert main([*args, "name=sysmetrics-on", *ON]) == 0
    assert main([*args, "name=sysmetrics-off"]) == 0
    client, runs = _runs(shared_out_dir, "system-metrics")
    by_name = {r.data.tags["ayt.run_name"]: r for r in runs}
    on, off = by_name["sysmetrics-on"], by_name["sysmetrics-off"]
    for key in CPU_KEYS:
        assert key in on.data.metrics, sorted(on.data.metrics)
    assert 0 <= on.data.metrics["system/cpu_utilization_percentage"] <= 100
    assert len(client.get_metric_history(on.info.run_id, CPU_KEYS[0])) >= 1
    assert not [k for k in off.data.metrics if k.startswith("system/")]     # off by default


def test_a_study_trial_logs_system_metrics_into_its_child_run(ray_session, shared_out_dir):
    """The trial's own process (a one-worker trial trains in its Tune process) finds the child
    run the driver keeps for it and logs this machine's metrics there."""
    out = shared_out_dir
    code = study_main("batch_size_sweep", [
        f"out_dir={out}", "study.name=sysmetrics-study", "study.axes.batch_size=[32]", "study.axes.loss=[pseudo_huber]",
        "study.seeds=[0]", "study.budget.amount=960", "study.preset=smoke", "study.budget.evals=3",
        "training.init=scratch", "fid.num_samples=50", "progress=false", "diagnostics.tangent.enabled=false", *ON])
    assert code == 0
    client, runs = _runs(out, "sysmetrics-study")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1
    for key in CPU_KEYS:
        assert key in children[0].data.metrics, sorted(children[0].data.metrics)
