"""The same study on a simulated multi-node cluster: `ray.cluster_utils.Cluster` with a head
and two worker nodes, shared storage in a temp dir, MLflow through a real `mlflow server`
on 127.0.0.1 read back over its REST API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from ayt.studies.runner import study_main


@pytest.fixture
def three_node_cluster():
    """Three one-CPU nodes (a head and two workers): a trial's two one-CPU workers cannot
    share a node, so they must land on two different nodes."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _get(uri: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def _post(uri: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_study_on_three_nodes_with_mlflow_server(three_node_cluster, mlflow_server, shared_out_dir, tmp_path):
    cluster, _ = three_node_cluster
    storage = tmp_path / "shared-storage"
    code = study_main("batch_size_sweep", [
        f"out_dir={shared_out_dir}", "study.name=cluster-sim", "study.axes.batch_size=[16]",
        "study.axes.loss=[pseudo_huber]", "study.budget.amount=320", "study.budget.evals=2",
        "scaling.num_workers=2", f"ray.address={cluster.address}", f"ray.storage_path={storage}",
        f"tracking.uri={mlflow_server}", "study.preset=smoke", "fid.num_samples=100", "progress=false"])
    assert code == 0

    # Every trial's two workers ran on two different nodes (provenance written into checkpoints).
    trial_dirs = sorted((p for p in storage.glob("cluster-sim-*/trials/*") if p.is_dir()))
    assert len(trial_dirs) == 1                # one trial: placement is what is tested, not the grid
    for trial in trial_dirs:
        final = trial / "iter_000000020"
        nodes = {json.loads((final / f"worker_rank{r}.json").read_text())["node_id"] for r in (0, 1)}
        assert len(nodes) == 2, trial

    # The runs and their FID curves, through the tracking server's REST API.
    experiment = _get(mlflow_server, "experiments/get-by-name", experiment_name="cluster-sim")["experiment"]
    runs = _post(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
    children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
    assert len(parents) == 1 and len(children) == 1
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        history = _get(mlflow_server, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="eval/fid_1step")
        assert [m["step"] for m in history["metrics"]] == [10, 20]
        assert all(m["value"] > 0 for m in history["metrics"])
