"""Two studies started at once on one machine (a researcher starting a second sweep while
the first runs) each run on a Ray of their own, finish cleanly and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil
from mlflow.tracking import MlflowClient


def _rays_started_by(procs: list[subprocess.Popen]) -> set[psutil.Process]:
    """The GCS servers the drivers started (their own local Rays): other test processes on
    this machine may start and stop Rays of their own meanwhile."""
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            found |= {p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "gcs_server"}
    return found


def _alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def test_two_studies_at_once_each_finish_on_their_own_ray(shared_out_dir, tmp_path):
    """Mutation caught: starting the local Ray without pinning `RAY_ADDRESS` for its
    processes (`start_local_ray`), where Ray's state API inside the cluster finds two local
    Rays and fails; or a study joining the other's Ray and taking its resources."""
    procs, logs = [], []
    for name in ("first", "second"):
        out = tmp_path / name
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ayt.studies.batch_size_sweep", f"out_dir={out}",
             f"cache_dir={shared_out_dir / 'cache'}",                 # the smoke artifacts the suite built
             "study.preset=smoke", "study.axes.batch_size=[32]", "study.axes.loss=[pseudo_huber]",
             "study.budget.amount=640", "study.budget.evals=2", "fid.num_samples=100", "progress=false"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}))
        time.sleep(2)                                                 # overlap, not lockstep
    rays, deadline = set(), time.monotonic() + 600
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        rays |= _rays_started_by(procs)
        time.sleep(0.5)
    codes = [p.wait(timeout=30) for p in procs]
    for log in logs:
        log.close()
    texts = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    for name, text in zip(("first", "second"), texts):
        assert "Found multiple active Ray instances" not in text
        client = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db")
        exp = client.get_experiment_by_name("batch_size_sweep")
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]       # parent + 1 child
    assert len(rays) == 2                                                    # a Ray each
    deadline = time.monotonic() + 30
    while any(_alive(r) for r in rays) and time.monotonic() < deadline:      # their Rays shut down
        time.sleep(1)
    assert not [r for r in rays if _alive(r)]
