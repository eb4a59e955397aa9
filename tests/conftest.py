"""Shared test set-up: no Ray token auth, one local Ray per session. The test process keeps
torch's default threads (it builds the shared artifacts while nothing else runs); Ray gives
each worker as many threads as CPUs it reserved."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_cfg():
    """The default config on the embedded dataset (composed through Hydra)."""
    from ayt.config import compose_config
    return compose_config([])


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small tensor tests: the test machine's cores are shared, and two
    spinning OpenMP threads run ~5x slower than one (one thread also keeps sums in one order)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1; yields its http URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    exe = str(exe) if exe.exists() else shutil.which("mlflow")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
        # No background job runners (huey): a plain tracking server starts faster.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: teardown stops the uvicorn child too
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (its own session), whatever state it is in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    proc.wait()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - shutting down is best effort at exit
        pass
