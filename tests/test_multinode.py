"""Multi-node Ray Train on a real `ray.cluster_utils.Cluster`: two nodes with one CPU each,
so two one-CPU workers can only be placed on different nodes."""

from __future__ import annotations

import json

import pytest

from ayt.train import main


@pytest.fixture
def two_node_cluster():
    """A head and one worker node (separate raylets); the session's local Ray is stopped
    first and started again by the next test that asks for it."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_on_two_nodes_complete(two_node_cluster, shared_out_dir):
    name = "two-nodes"
    code = main(["experiment=smoke", "scaling.backend=ray", "progress=false", f"out_dir={shared_out_dir}",
                 f"name={name}", "scaling.num_workers=2", f"ray.address={two_node_cluster.address}",
                 "training.iterations=40", "training.eval_every=40", "training.checkpoint_every=20",
                 "fid.num_samples=100"])
    assert code == 0
    final = shared_out_dir / "ray" / name / "iter_000000040"
    workers = [json.loads((final / f"worker_rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["node_id"] != workers[1]["node_id"]
    assert {w["node_id"] for w in workers} <= {n["NodeID"] for n in _alive_nodes()}


def _alive_nodes():
    import ray
    return [n for n in ray.nodes() if n["Alive"]]
