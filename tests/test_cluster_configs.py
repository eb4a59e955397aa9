"""The cluster configs are checked the way Ray and KubeRay read them, offline."""

from __future__ import annotations

import copy
import json
import os
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


def test_a_trial_on_another_node_resolves_its_config_with_the_drivers_environment(monkeypatch, tmp_path):
    """The AYT_* variables are set for the study driver (the README's `env ... python -m`), not
    on the worker nodes its trials run on: a trial's config must still name the driver's
    tracking server, storage, output and cache, not the defaults. Mutation caught: resolving the
    trial's config with the worker's own environment (the trial found no MLflow and hung)."""
    from ayt.studies.engine.plan import plan_study
    driver = {"AYT_STORAGE": str(tmp_path / "store"), "AYT_TRACKING_URI": "http://127.0.0.1:1",
              "AYT_OUT_DIR": str(tmp_path / "out"), "AYT_CACHE": str(tmp_path / "cache")}
    for key, value in driver.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    plan = plan_study("batch_size_sweep", ["scaling=rehearsal", "study.preset=smoke", "study.axes.batch_size=[16]",
                                           "study.axes.loss=[pseudo_huber]", "study.seeds=[0]"])
    for key in driver:                                     # a worker node: none of them set
        monkeypatch.delenv(key)
    monkeypatch.setenv("AYT_TRACKING_URI", "http://elsewhere:5000")
    cfg = plan.trial_config({"batch_size": 16, "loss": "pseudo_huber", "seed": 0})
    assert cfg.tracking.uri == driver["AYT_TRACKING_URI"]
    assert cfg.ray.storage_path.startswith(f"{driver['AYT_STORAGE']}/ray/")
    assert cfg.out_dir == driver["AYT_OUT_DIR"] and cfg.cache_dir == driver["AYT_CACHE"]
    assert os.environ["AYT_TRACKING_URI"] == "http://elsewhere:5000" and "AYT_CACHE" not in os.environ


def test_scaling_cluster_worker_fits_the_gpu_node_types(launcher):
    """The per-worker bundle fits one GPU node of the launcher config and of the RayJob."""
    bundle = _compose(["scaling=cluster"]).scaling.resources_per_worker
    node = launcher["available_node_types"]["gpu_worker"]["resources"]
    assert all(node.get(k, 0) >= v for k, v in bundle.items())
    (workers,) = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= bundle.CPU and int(limits["nvidia.com/gpu"]) >= bundle.GPU


# --- GPU workers against their instance types ---------------------------------------------
# The instance types the cluster configs name, from AWS's instance-type pages: vCPUs, memory
# (GiB), GPUs, and the pods EKS allows on one (its ENI limit), which sizes the kubelet's share.
NODE_TYPES = {
    "g5.xlarge": {"cpu": 4, "memory_gib": 16, "gpus": 1, "gpu": "A10G", "max_pods": 58},
}
# What a pod of a GPU node type cannot have, besides the kubelet's share: the daemonsets every
# EKS GPU node runs (aws-node 25m, kube-proxy 100m CPU; their memory, the NVIDIA device plugin's).
DAEMONSET_CPU_M, DAEMONSET_MEMORY_MIB = 125, 256


def _quantity_mib(text) -> float:
    """A Kubernetes memory quantity (16Gi, 512Mi, 1G, bytes) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2, "K": 1e3 / 2 ** 20, "M": 1e6 / 2 ** 20,
             "G": 1e9 / 2 ** 20, "T": 1e12 / 2 ** 20}
    text = str(text)
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * units[unit]
    return float(text) / 2 ** 20


def _cpu_m(text) -> float:
    text = str(text)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def _eks_allocatable(node: dict) -> tuple[float, float]:
    """(CPU millicores, memory MiB) a node offers pods: its capacity less the EKS AMI's
    kube-reserved (CPU: 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% of
    the rest; memory: 255 MiB + 11 MiB per pod it may hold), the 100 MiB eviction threshold
    and the daemonsets."""
    cores = node["cpu"]
    reserved_m = 60 + 10 * (cores > 1) + 5 * min(max(cores - 2, 0), 2) + 2.5 * max(cores - 4, 0)
    memory = node["memory_gib"] * 1024 - (255 + 11 * node["max_pods"]) - 100 - DAEMONSET_MEMORY_MIB
    return cores * 1000 - reserved_m - DAEMONSET_CPU_M, memory


def _launcher_gpu_worker(launcher: dict) -> tuple[str, dict]:
    spec = launcher["available_node_types"]["gpu_worker"]
    return spec["node_config"]["InstanceType"], spec["resources"]


def _rayjob_gpu_worker() -> tuple[str, dict]:
    (workers,) = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    return pod["nodeSelector"]["node.kubernetes.io/instance-type"], pod["containers"][0]["resources"]


def test_launcher_gpu_worker_fits_its_instance_type(launcher):
    """The autoscaler plans with the declared resources: more than the instance has means
    placements that never run; the scaling=cluster worker must fit what is declared."""
    instance, declared = _launcher_gpu_worker(launcher)
    node = NODE_TYPES[instance]
    assert declared.get("CPU", 0) <= node["cpu"] and declared.get("GPU", 0) <= node["gpus"]
    assert declared.get("memory", 0) <= node["memory_gib"] * 2 ** 30
    bundle = _compose(["scaling=cluster"]).scaling.resources_per_worker
    assert all(declared.get(k, 0) >= v for k, v in bundle.items())


def test_rayjob_gpu_worker_pod_fits_its_node_type():
    """A pod whose requests exceed what its node type offers pods stays Pending forever (24Gi
    on a 16 GiB g5.xlarge did); limits equal requests (a Guaranteed pod, whose CPU limit is
    what Ray counts), and the scaling=cluster worker must fit what Ray counts."""
    instance, resources = _rayjob_gpu_worker()
    node = NODE_TYPES[instance]
    cpu_m, memory_mib = _eks_allocatable(node)
    requests, limits = resources["requests"], resources["limits"]
    assert requests == limits
    assert _cpu_m(requests["cpu"]) <= cpu_m, (requests["cpu"], cpu_m)
    assert _quantity_mib(requests["memory"]) <= memory_mib, (requests["memory"], memory_mib)
    assert int(requests["nvidia.com/gpu"]) <= node["gpus"]
    bundle = _compose(["scaling=cluster"]).scaling.resources_per_worker
    assert _cpu_m(limits["cpu"]) >= bundle.CPU * 1000 and int(limits["nvidia.com/gpu"]) >= bundle.GPU


def test_both_cluster_configs_use_one_gpu_instance_type(launcher):
    """The same role on the same machine: a study sized on one config runs on the other."""
    assert _launcher_gpu_worker(launcher)[0] == _rayjob_gpu_worker()[0]


def test_the_allocatable_arithmetic_refuses_what_never_schedules():
    """The check above can fail: the requests this config had (4 CPUs, 24Gi) and a full node's
    worth (4 CPUs, 16Gi) do not fit a g5.xlarge's pods; 3 CPUs and 12Gi do."""
    cpu_m, memory_mib = _eks_allocatable(NODE_TYPES["g5.xlarge"])
    assert _quantity_mib("24Gi") > memory_mib and _quantity_mib("16Gi") > memory_mib and _cpu_m("4") > cpu_m
    assert _quantity_mib("12Gi") <= memory_mib and _cpu_m("3") <= cpu_m
