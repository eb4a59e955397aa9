"""Every entry point checks every path and address in its config before any work: one line
naming the field, exit code 2, nothing written (no MLflow store, no artifact, no Ray).
Unreachable addresses are real unused ports on 127.0.0.1; unwritable paths are real ones."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ayt.studies.runner import study_main
from ayt.train import main as train_main

UNWRITABLE = "/proc/ayt-cannot-write-here"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(tmp: Path) -> list[tuple[list[str], str, str]]:
    port = _unused_port()
    return [
        ([f"out_dir={UNWRITABLE}"], "out_dir", "cannot write"),
        ([f"out_dir={tmp}", f"cache_dir={UNWRITABLE}/cache"], "cache_dir", "cannot write"),
        ([f"out_dir={tmp}", f"ray.storage_path={UNWRITABLE}/ray"], "ray.storage_path", "cannot write"),
        ([f"out_dir={tmp}", f"tracking.uri=sqlite:///{UNWRITABLE}/mlflow.db"], "tracking.uri", "cannot write"),
        ([f"out_dir={tmp}", f"tracking.uri=http://127.0.0.1:{port}"], "tracking.uri", "no MLflow server answers"),
        ([f"out_dir={tmp}", f"ray.address=127.0.0.1:{port}"], "ray.address", "nothing answers"),
        ([f"out_dir={tmp}", "fid.inception_weights=/nonexistent/pt_inception.pth"], "fid.inception_weights",
         "no such file"),
        ([f"out_dir={tmp}", "feature_map.channels=[]"], "feature_map.channels", "at least 4 entries"),
    ]


def _assert_one_clean_line(capsys, field: str, words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert field in err[0] and words in err[0], err[0]


@pytest.mark.parametrize("index", range(8))
def test_train_checks_every_location_before_any_work(tmp_path, capsys, index):
    """Mutation caught: dropping a check from `check_locations` (or the call in
    `ayt.train.main`): the run would start pretraining or hang on `ray.init`."""
    overrides, field, words = _cases(tmp_path)[index]
    code = train_main(["experiment=smoke", "scaling.backend=ray", "progress=false", *overrides])
    assert code == 2
    _assert_one_clean_line(capsys, field, words)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("index", [0, 4, 5, 7])
def test_study_checks_every_location_before_ray(tmp_path, capsys, index):
    import ray
    overrides, field, words = _cases(tmp_path)[index]
    if ray.is_initialized():
        ray.shutdown()      # so "nothing started Ray" can fail; the ray_session fixture restarts it
    code = study_main("batch_size_sweep", ["study.preset=smoke", "progress=false", *overrides])
    assert code == 2
    _assert_one_clean_line(capsys, field, words)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()
