"""Shared test set-up: no Ray token auth, one local Ray per test process.

The suite runs on pytest-xdist workers (`-n auto` in pyproject.toml; `-n 0` runs it in one
process). Under xdist every test process and every process it starts keeps one torch thread;
in one process the test process keeps torch's default threads. Tune trials keep one thread
per reserved CPU either way.

`AYT_TEST_TORCH_THREADS=N python -m pytest` runs the test processes at N torch threads: other
kernels and summation orders, so the shared artifacts they build (pretrained denoiser, feature
map, FID classifier) and every trial trained from them come out at other numbers. No test may
depend on those numbers; running the suite at 1 and at 2 threads is how that is checked
(at 2, with `-n 0`: two workers of two threads each oversubscribe two cores).
Modules that ask for `one_torch_thread` keep 1.
"""

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

TEST_THREADS = os.environ.get("AYT_TEST_TORCH_THREADS")
# pytest-xdist runs the suite in several worker processes (`-n`, see pytest_xdist_auto_num_workers).
# Each one, and every process it starts (study drivers, Ray), keeps one torch/OpenMP thread: on
# cores the other workers keep busy, spinning OpenMP threads run many times slower (a 10 s
# artifact build took over 300 s at 2 threads beside one busy core).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER and not TEST_THREADS:
    TEST_THREADS = "1"
if TEST_THREADS:
    os.environ["OMP_NUM_THREADS"] = TEST_THREADS
MAX_XDIST_WORKERS = 4

import pytest  # noqa: E402


def pytest_report_header(config):
    if TEST_THREADS:
        return f"torch threads in each test process: {TEST_THREADS} (AYT_TEST_TORCH_THREADS, else 1 under -n)"


END_TO_END_FIXTURES = {"shared_out_dir", "ray_session"}


def pytest_configure(config):
    """Torch at TEST_THREADS in this process; and xdist hands out modules in the order
    `pytest_collection_modifyitems` leaves them, not sorted by its own count of tests per
    module (the default since pytest-xdist 3.7)."""
    if TEST_THREADS:
        import torch
        torch.set_num_threads(int(TEST_THREADS))
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Modules by their end-to-end tests (a Ray, a trained run), most first, the rest after in
    their order: xdist hands whole modules to workers as they free up, so the longest start
    first and the short ones last keep the workers' loads even at the end. Each module's tests
    keep their order."""
    heavy: dict[str, int] = {}
    for item in items:
        if hasattr(item, "module") and END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            heavy[item.module.__name__] = heavy.get(item.module.__name__, 0) + 1
    items.sort(key=lambda item: -heavy.get(getattr(getattr(item, "module", None), "__name__", ""), 0))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default addopts): one worker per core, at most MAX_XDIST_WORKERS; each
    starts its own local Ray and servers, so more would trade memory for little."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_XDIST_WORKERS))


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


@pytest.fixture
def stand_in_metric(monkeypatch):
    """Install `value(params) -> float` (params: the trial's MLflow run params, the flattened
    config: `loss`, `lr`, `seed`, ...) as every FID the study driver reads back from MLflow, so
    a protocol decides on a case the test constructs, on every machine: seed rounds, tuning and
    its edge extension, confirmation candidates. The trials still train on the real Ray, report
    to Tune and log their real FIDs to MLflow (what the report's tables show); only the
    driver's view (`ayt.studies.engine.tune_backend.load_trials`, in this process) is replaced: every
    evaluation of a trial's FID curves reads `value`, so it is the trial's score at any endpoint."""
    from mlflow.tracking import MlflowClient

    from ayt.metrics import FID_KEYS
    from ayt.studies.engine import tune_backend
    real = tune_backend.load_trials

    def install(value):
        def load(uri, parent_run_id):
            trials = real(uri, parent_run_id)
            client = MlflowClient(uri)
            for trial in trials:
                stand_in = float(value(client.get_run(trial.run_id).data.params))
                for key in FID_KEYS:
                    if trial.curves.get(key):
                        trial.curves[key] = [(step, stand_in) for step, _ in trial.curves[key]]
            return trials
        monkeypatch.setattr(tune_backend, "load_trials", load)
    return install


@pytest.fixture(scope="session")
def shared_out_dir(tmp_path_factory):
    """One out_dir per test process: its artifact cache (pretrained model, feature map,
    FID extractor and statistics) is built once and shared by every end-to-end test. Under
    pytest-xdist the workers' caches are one directory (the cache's file locks let one worker
    build what another waits for), so each artifact is built once per session."""
    out = tmp_path_factory.mktemp("ayt-out")
    if XDIST_WORKER:
        common = tmp_path_factory.getbasetemp().parent / "ayt-cache"
        common.mkdir(exist_ok=True)
        (out / "cache").symlink_to(common, target_is_directory=True)
    return out


@pytest.fixture
def ray_session():
    """The test process's one local Ray, started on first use; tests that need their own
    cluster shut it down and it starts again here. No dashboard: no test reads it, and its
    processes cost CPU at every start (the cluster rehearsal checks a real dashboard)."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def first_finished_child():
    """Poll a driver's MLflow child runs until one has FINISHED (its run id) or the driver exits
    or `timeout` passes (an AssertionError saying which): how the kill-and-resume tests know
    when to kill. `children()` may raise while the experiment does not exist yet."""
    def wait(children, proc: subprocess.Popen, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                done = [r.info.run_id for r in children() if r.info.status == "FINISHED"]
            except Exception:  # noqa: BLE001 - the store or the experiment may not exist yet
                done = []
            if done:
                return done[0]
            time.sleep(1)
        raise AssertionError(f"no trial finished before the deadline (driver exit code {proc.poll()})")
    return wait


class StandIns:
    """Small local stand-ins for the dataset files `ayt.data` reads (nothing downloads)."""

    @staticmethod
    def idx(path, array) -> None:
        """The MNIST idx format: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, raw bytes."""
        import struct

        import numpy as np
        with open(path, "wb") as f:
            f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim))
            f.write(struct.pack(f">{array.ndim}I", *array.shape))
            f.write(np.asarray(array).astype(np.uint8).tobytes())

    @classmethod
    def mnist(cls, root, folder="MNIST", n_train=6, n_test=4, size=28, seed=0, digits=False) -> Path:
        """`<root>/<folder>/raw/` as torchvision's MNIST/FashionMNIST read it, 28x28 uint8: noise
        with labels 0, 1, ... mod 10, or (digits=True) scikit-learn's 8x8 digits enlarged, with
        their labels, for a classifier that can learn something; returns `root` (`dataset.root`)."""
        import numpy as np
        raw = Path(root) / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        if digits:
            import torch

            from ayt.data import digits_arrays
            digit_images, labels = digits_arrays()
            big = torch.nn.functional.interpolate(torch.from_numpy(digit_images).float()[:, None] * 16,
                                                  size=(size, size), mode="bilinear", align_corners=False)
            images = big[:, 0].clamp(0, 255).round().numpy()
            assert n_train + n_test <= len(labels)
        else:
            rng = np.random.default_rng(seed)
            images = rng.integers(0, 256, (n_train + n_test, size, size))
            labels = np.concatenate([np.arange(n_train), np.arange(n_test)]) % 10
        for split, rows in (("train", slice(0, n_train)), ("t10k", slice(n_train, n_train + n_test))):
            cls.idx(raw / f"{split}-images-idx3-ubyte", images[rows])
            cls.idx(raw / f"{split}-labels-idx1-ubyte", labels[rows])
        return Path(root)

    @staticmethod
    def cifar10(root, n=2, seed=0) -> Path:
        """`<root>/cifar-10-batches-py/` in the python-pickle format. Enough for validation (it
        checks the files exist); torchvision's loader also checks their md5, which these fail."""
        import pickle

        import numpy as np
        base = Path(root) / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(range(n))}
            (base / name).write_bytes(pickle.dumps(batch))
        (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
        return Path(root)

    @staticmethod
    def pngs(root, sizes, mode="RGB") -> Path:
        """Random PNGs of the given (width, height), spread over nested folders under `root`."""
        import numpy as np
        from PIL import Image
        root = Path(root)
        rng = np.random.default_rng(0)
        for i, (w, h) in enumerate(sizes):
            sub = root / "a" if i % 2 else root / "b" / "deep"
            sub.mkdir(parents=True, exist_ok=True)
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(sub / f"img{i}.png")
        return root


@pytest.fixture(scope="session")
def stand_ins():
    """Writers of local stand-in dataset files (`StandIns`)."""
    return StandIns


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
