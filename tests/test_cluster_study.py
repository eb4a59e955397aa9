"""Multi-node runs on one simulated cluster: `ray.cluster_utils.Cluster` with a head and two
worker nodes of one CPU each, so two one-CPU workers can only be placed on different nodes.
One cluster serves the module: a plain Ray Train run with two workers, and a study whose
trial trains on two workers, with shared storage in a temp dir and MLflow through a real
`mlflow server` on 127.0.0.1 read back over its REST API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from ayt.studies.runner import study_main
from ayt.train import main


@pytest.fixture(scope="module")
def three_node_cluster():
    """Three one-CPU nodes (a head and two workers, separate raylets), started once for the
    module; the session's local Ray is stopped first and started again by the next test that
    asks for it."""
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


def _alive_nodes():
    import ray
    return [n for n in ray.nodes() if n["Alive"]]


def test_two_workers_on_two_nodes_complete(three_node_cluster, shared_out_dir):
    cluster, _ = three_node_cluster
    name = "two-nodes"
    code = main(["experiment=smoke", "scaling.backend=ray", "progress=false", f"out_dir={shared_out_dir}",
                 f"name={name}", "scaling.num_workers=2", f"ray.address={cluster.address}",
                 "training.iterations=20", "training.eval_every=20", "training.checkpoint_every=20",
                 "fid.num_samples=50"])                            # placement is what is tested
    assert code == 0
    final = shared_out_dir / "ray" / name / "iter_000000020"
    workers = [json.loads((final / f"worker_rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["node_id"] != workers[1]["node_id"]
    assert {w["node_id"] for w in workers} <= {n["NodeID"] for n in _alive_nodes()}


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
