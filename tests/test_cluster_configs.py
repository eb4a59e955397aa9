"""The cluster configs are checked the way Ray and KubeRay read them, offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from hydra import compose, initialize_config_dir
from ray.autoscaler._private.util import prepare_config, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
LAUNCHER = CONF / "cluster" / "ray-cluster.yaml"
RAYJOB = CONF / "cluster" / "rayjob.yaml"


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture()
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_launcher_config_matches_rays_schema(launcher, ray_schema):
    jsonschema.validate(launcher, ray_schema)


def test_launcher_config_passes_ray_prepare_and_validate(launcher):
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0  # no training on the head
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1
    assert gpu_types[0]["min_workers"] == 0 and gpu_types[0]["max_workers"] >= 2
    assert prepared["idle_timeout_minutes"] > 0
    installs = [c for c in prepared["worker_setup_commands"] if "pip install" in c]
    assert any("ayt" in c for c in installs), installs  # workers get this package


@pytest.mark.parametrize(
    "misspell",
    [
        lambda c: c["available_node_types"]["gpu_worker"].__setitem__(
            "max_wokers", c["available_node_types"]["gpu_worker"].pop("max_workers")
        ),
        lambda c: c.__setitem__("idle_timout_minutes", c.pop("idle_timeout_minutes")),
    ],
    ids=["node_type.max_wokers", "idle_timout_minutes"],
)
def test_misspelled_key_is_rejected(launcher, ray_schema, misspell):
    misspell(launcher)
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        jsonschema.validate(launcher, ray_schema)
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        validate_config(prepare_config(copy.deepcopy(launcher)))


def test_rayjob_manifest_has_what_kuberay_requires():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].split()[:4] == ["python", "-m", "ayt.studies.batch_size_sweep", "scaling=cluster"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["groupName"]
    assert workers["replicas"] == 0 and workers["minReplicas"] == 0 and workers["maxReplicas"] >= 2
    (container,) = workers["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # Head and workers mount the same claim: checkpoints and Tune state survive any pod.
    for pod in (head["template"]["spec"], workers["template"]["spec"]):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounted = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert claims and set(claims) <= mounted
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AYT_TRACKING_URI"].startswith("http")


def test_scaling_cluster_composes_with_gpus():
    cfg = _compose(["scaling=cluster"])
    assert cfg.scaling.use_gpu is True and cfg.scaling.backend == "ray"
    assert cfg.scaling.num_workers >= 1
    assert cfg.scaling.resources_per_worker.GPU == 1


def test_scaling_cluster_puts_shared_state_on_shared_storage(monkeypatch):
    monkeypatch.setenv("AYT_STORAGE", "s3://bucket/ayt")
    monkeypatch.setenv("AYT_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.delenv("AYT_CACHE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = _compose(["scaling=cluster"])
    assert cfg.ray.address == "auto"  # join the cluster the job was submitted to
    assert cfg.ray.storage_path == "s3://bucket/ayt/ray"
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert cfg.cache_dir == "/mnt/shared/ayt/cache"  # the cache is a shared POSIX path, never a URI
    assert cfg.scaling.backend == "ray"


def test_scaling_cluster_worker_fits_the_gpu_node_types(launcher):
    """The per-worker bundle fits one GPU node of the launcher config and of the RayJob."""
    bundle = _compose(["scaling=cluster"]).scaling.resources_per_worker
    node = launcher["available_node_types"]["gpu_worker"]["resources"]
    assert all(node.get(k, 0) >= v for k, v in bundle.items())
    (workers,) = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= bundle.CPU and int(limits["nvidia.com/gpu"]) >= bundle.GPU
