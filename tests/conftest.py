"""Shared test set-up: one thread per torch process (2 cores are shared by every test
process, Ray worker and MLflow server), no Ray token auth, one local Ray per session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_cfg():
    """The default config on the embedded dataset (composed through Hydra)."""
    from ayt.config import compose_config
    return compose_config([])


@pytest.fixture(scope="session")
def shared_out_dir(tmp_path_factory):
    """One out_dir per test session: its artifact cache (pretrained model, feature map,
    FID extractor and statistics) is built once and shared by every end-to-end test."""
    return tmp_path_factory.mktemp("ayt-out")


@pytest.fixture
def ray_session():
    """The test session's one local Ray (dashboard and state API on 127.0.0.1), started on
    first use; tests that need their own cluster shut it down and it starts again here."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - shutting down is best effort at exit
        pass
