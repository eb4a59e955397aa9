"""Two studies started at once on one machine (a researcher starting a second sweep while
the first runs) each run on a Ray of their own, finish cleanly and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient


def _gcs_addresses() -> set[str]:
    from ray._private.services import find_gcs_addresses
    return set(find_gcs_addresses())


def test_two_studies_at_once_each_finish_on_their_own_ray(shared_out_dir, tmp_path):
    """Mutation caught: starting the local Ray without pinning `RAY_ADDRESS` for its
    processes (`start_local_ray`), where Ray's state API inside the cluster finds two local
    Rays and fails; or a study joining the other's Ray and taking its resources."""
    before = _gcs_addresses()
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
    codes = [p.wait(timeout=600) for p in procs]
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
    deadline = time.monotonic() + 30
    while _gcs_addresses() != before and time.monotonic() < deadline:        # their Rays shut down
        time.sleep(1)
    assert _gcs_addresses() == before
