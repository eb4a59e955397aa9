"""Preflight: each failure is a one-line error naming the field; a real cluster setup passes."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from ray.autoscaler._private.util import prepare_config

from ayt import preflight as pf
from ayt.errors import ConfigError
from ayt.preflight import PreflightError, preflight

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = Path(__file__).resolve().parents[1] / "conf"
LAUNCHER = yaml.safe_load((CONF / "cluster" / "ray-cluster.yaml").read_text())


def _cfg(tmp_path: Path, *overrides: str):
    """The real root config with scaling=cluster, every location under tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            config_name="config",
            overrides=[
                "scaling=cluster",
                f"out_dir={tmp_path / 'runs'}",
                f"ray.storage_path={tmp_path / 'shared' / 'ray'}",
                f"cache_dir={tmp_path / 'shared' / 'cache'}",
                "tracking.uri=null",
                "ray.address=null",
                *overrides,
            ],
        )


@pytest.fixture(autouse=True)
def _nothing_to_discover(monkeypatch, tmp_path):
    """Discovery must not pick up a ~/ray_bootstrap_config.yaml of the machine running the tests,
    nor the session's Ray that an earlier test in this process started (the `ray_session`
    fixture starts it again where a test needs it): whichever tests ran before, these see the
    machine as each one sets it up."""
    monkeypatch.setattr(pf, "RAY_BOOTSTRAP_CONFIG", str(tmp_path / "absent.yaml"))
    import ray
    if ray.is_initialized():
        ray.shutdown()


def _cpu_only_launcher() -> dict:
    config = copy.deepcopy(LAUNCHER)
    gpu = config["available_node_types"].pop("gpu_worker")
    config["available_node_types"]["cpu_worker"] = {
        "resources": {"CPU": 8}, "min_workers": 0, "max_workers": 4, "node_config": gpu["node_config"],
    }
    return config


# --- failures -----------------------------------------------------------------------------

def test_unwritable_storage_path(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")  # blocks mkdir even for root
    cfg = _cfg(tmp_path, f"ray.storage_path={tmp_path / 'a_file' / 'ray'}")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 4, "GPU": 2})
    assert isinstance(err.value, ConfigError) and err.value.field == "ray.storage_path"
    assert str(err.value).startswith("ray.storage_path: cannot write")
    assert "\n" not in str(err.value)


def test_unwritable_storage_uri_through_pyarrow(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = _cfg(tmp_path, f"ray.storage_path=file://{tmp_path / 'a_file' / 'ray'}")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 4, "GPU": 2})
    assert err.value.field == "ray.storage_path"


def test_unwritable_cache_dir(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = _cfg(tmp_path, f"cache_dir={tmp_path / 'a_file' / 'cache'}")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 4, "GPU": 2})
    assert err.value.field == "cache_dir"


def test_cache_dir_must_be_a_path(tmp_path):
    cfg = _cfg(tmp_path, "cache_dir=s3://bucket/cache")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 4, "GPU": 2})
    assert err.value.field == "cache_dir" and "must be a path" in str(err.value)


def test_unreachable_tracking_server(tmp_path):
    port = _free_port()  # closed again: nothing listens there
    cfg = _cfg(tmp_path, f"tracking.uri=http://127.0.0.1:{port}")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 4, "GPU": 2})
    assert err.value.field == "tracking.uri"
    assert f"127.0.0.1:{port}" in str(err.value) and "\n" not in str(err.value)


def test_gpus_that_no_node_type_offers(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(PreflightError) as err:
        preflight(cfg, cluster_resources={"CPU": 2}, autoscaler_config=_cpu_only_launcher())
    assert err.value.field == "scaling.use_gpu"
    assert "cpu_worker {CPU: 8}" in str(err.value)


def test_gpus_missing_from_running_cluster_without_autoscaler(tmp_path):
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(tmp_path), cluster_resources={"CPU": 16})
    assert err.value.field == "scaling.use_gpu"


def test_more_gpus_than_the_autoscaler_can_ever_start(tmp_path):
    config = copy.deepcopy(LAUNCHER)
    config["max_workers"] = 1  # the global cap binds before gpu_worker's own max_workers
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(tmp_path, "scaling.num_workers=2"), autoscaler_config=config)
    assert err.value.field == "scaling.num_workers"
    assert "at most 1 workers fit" in str(err.value)


def test_worker_bundle_larger_than_any_node(tmp_path):
    cfg = _cfg(tmp_path, "scaling.resources_per_worker.CPU=16")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, autoscaler_config=LAUNCHER)
    assert err.value.field == "scaling.resources_per_worker"


def test_gpu_resources_without_use_gpu(tmp_path):
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(tmp_path, "scaling.use_gpu=false"), cluster_resources={"CPU": 4, "GPU": 2})
    assert err.value.field == "scaling.use_gpu"


# --- passing ------------------------------------------------------------------------------

def test_cluster_setup_passes(tmp_path, mlflow_server):
    """Empty running cluster (CPU-0 head), GPUs only through the autoscaler: fits."""
    cfg = _cfg(tmp_path, f"tracking.uri={mlflow_server}")
    lines = preflight(cfg, cluster_resources={"CPU": 0}, autoscaler_config=prepare_config(copy.deepcopy(LAUNCHER)))
    assert lines[0].startswith("scaling: 2 worker(s)")
    assert lines[1].startswith(f"ray.storage_path: {tmp_path / 'shared' / 'ray'} writable")
    assert lines[2].startswith("cache_dir: ")
    assert lines[3] == f"tracking.uri: MLflow server answers at {mlflow_server}"
    assert "at most 4 trial(s) at once" in lines[4]  # 8 GPU nodes / 2 workers per trial
    # The probe file is gone, and the check created nothing (it probes the nearest existing parent).
    assert not (tmp_path / "shared" / "ray").exists() or not any((tmp_path / "shared" / "ray").iterdir())
    assert not [p for p in tmp_path.rglob(".ayt-preflight-*")]


def test_storage_uri_passes_through_pyarrow(tmp_path):
    cfg = _cfg(tmp_path, f"ray.storage_path=file://{tmp_path / 'bucket' / 'ray'}")
    lines = preflight(cfg, cluster_resources={"CPU": 8, "GPU": 2})
    assert lines[1].startswith(f"ray.storage_path: file://{tmp_path / 'bucket' / 'ray'} writable")
    assert (tmp_path / "bucket" / "ray").is_dir() and not any((tmp_path / "bucket" / "ray").iterdir())


def test_discovers_the_bootstrap_config_of_a_ray_up_head(tmp_path, monkeypatch):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(_cpu_only_launcher()))
    monkeypatch.setattr(pf, "RAY_BOOTSTRAP_CONFIG", str(bootstrap))
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(tmp_path))
    assert err.value.field == "scaling.use_gpu"


def test_discovers_a_running_ray(tmp_path, monkeypatch):
    """With Ray initialised, its resources are used: no GPU on this local Ray is an error, while a
    joined cluster (ray.address set) may still autoscale unseen, so that is only reported."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(PreflightError) as err:
            preflight(_cfg(tmp_path))
        assert err.value.field == "scaling.use_gpu"
        lines = preflight(_cfg(tmp_path, "ray.address=auto"))
        assert "ray.worker_start_timeout_s" in lines[-1]
        assert preflight(_cfg(tmp_path, "scaling=local"))[-1].startswith("resources: 1 x {CPU: 1} fit")
    finally:
        ray.shutdown()


def test_nothing_to_check_against_is_said(tmp_path):
    lines = preflight(_cfg(tmp_path))
    assert "not checked" in lines[-1]
