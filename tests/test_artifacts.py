"""The shared-artifact cache under concurrent use by real processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from ayt.artifacts import ARTIFACT_SOURCES, ArtifactCache, code_version, source_version

SPEC = {"kind": "test", "size": 3}
KIND = "fid_classifier"          # any registered kind: its code version is part of the key
PARTS = ("a.bin", "b.bin", "c.bin")


def _slow_build(directory: Path, log: str) -> None:
    """Writes its files one by one, slowly, and records each build in `log` (O_APPEND)."""
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    for name in PARTS:
        time.sleep(0.15)
        (directory / name).write_bytes(name.encode() * 1000)


def _complete(path: Path) -> bool:
    return all((path / n).is_file() and (path / n).stat().st_size == 5000 for n in PARTS) \
        and json.loads((path / "spec.json").read_text()) == SPEC


def _worker(root: str, log: str, ready, start, results) -> None:
    ready.put(os.getpid())
    start.wait()
    path = ArtifactCache(root).get_or_build(KIND, SPEC, lambda d: _slow_build(d, log))
    results.put((str(path), _complete(path)))


def _watcher(final: str, ready, stop, results) -> None:
    """Polls the final path the whole time: whenever it exists it must be complete."""
    seen, partial = 0, 0
    ready.put(os.getpid())
    while not stop.is_set() or not seen:
        path = Path(final)
        if path.is_dir():
            seen += 1
            try:
                partial += not _complete(path)
            except (OSError, ValueError):
                partial += 1
        time.sleep(0.005)
    results.put(("watch", seen, partial))


def test_get_or_build_under_concurrent_processes_builds_once_and_never_shows_a_partial_dir(tmp_path):
    """Mutations caught in ArtifactCache.get_or_build: removing the lock (`with file_lock(...)`
    -> `final.parent.mkdir(...)` + `with contextlib.nullcontext()`): every process builds, and
    all but one then fail to rename onto the existing directory; dropping the re-check inside the lock: the waiters
    build again; building straight into the final directory instead of a temporary one: the
    watcher (and early returners) see a directory without all its files."""
    ctx = mp.get_context("spawn")
    root, log = tmp_path / "cache", tmp_path / "builds.log"
    final = ArtifactCache(root).path(KIND, SPEC)
    ready, start, stop, results = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(str(root), str(log), ready, start, results)) for _ in range(4)]
    watcher = ctx.Process(target=_watcher, args=(str(final), ready, stop, results))
    for p in [watcher, *workers]:
        p.start()
    for _ in range(5):            # every spawned interpreter is up and waiting: start them at once
        ready.get(timeout=60)
    start.set()
    try:
        for p in workers:
            p.join(60)
    finally:
        stop.set()
        watcher.join(30)
        for p in [watcher, *workers]:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    got = [results.get(timeout=10) for _ in range(5)]
    watch = next(r for r in got if r[0] == "watch")
    paths = [r for r in got if r[0] != "watch"]
    assert len(log.read_text().splitlines()) == 1            # built exactly once
    assert {p for p, _ in paths} == {str(final)} and all(ok for _, ok in paths)
    assert watch[1] > 0 and watch[2] == 0                    # seen, never partial
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.endswith(".lock")) == [final.name]


def _module(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.py").write_text(text)


def test_source_version_follows_the_bytes_of_the_builder_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "ayt_test_builder_a", "def build():\n    return 1\n")
    _module(tmp_path, "ayt_test_builder_b", "X = 2\n")
    modules = ("ayt_test_builder_a", "ayt_test_builder_b")
    first = source_version(modules)
    assert source_version(modules) == first == source_version(reversed(modules))   # same code, same version
    _module(tmp_path, "ayt_test_builder_a", "def build():\n    return 2\n")       # the builder changed
    changed = source_version(modules)
    assert changed != first and source_version(modules[1:]) != changed
    _module(tmp_path, "ayt_test_builder_a", "def build():\n    return 1\n")       # and back
    assert source_version(modules) == first
    with pytest.raises(ModuleNotFoundError):
        source_version(("ayt_test_no_such_module",))


def test_cache_key_includes_the_code_version(tmp_path, monkeypatch):
    """The same config built by other code lands in another directory; the same code finds it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "ayt_test_builder_c", "LABEL = 'draw'\n")
    monkeypatch.setitem(ARTIFACT_SOURCES, "feature_map", ("ayt_test_builder_c",))
    cache = ArtifactCache(tmp_path / "cache")
    built = cache.get_or_build("feature_map", SPEC, lambda d: (d / "x").write_text("old"))
    assert cache.path("feature_map", SPEC) == built
    assert json.loads((built / "code.json").read_text())["version"] == code_version("feature_map")
    _module(tmp_path, "ayt_test_builder_c", "LABEL = 'shift'\n")
    rebuilt = cache.get_or_build("feature_map", SPEC, lambda d: (d / "x").write_text("new"))
    assert rebuilt != built and (rebuilt / "x").read_text() == "new" and (built / "x").read_text() == "old"
    with pytest.raises(KeyError, match="ARTIFACT_SOURCES"):
        cache.path("no_such_kind", SPEC)


def test_every_artifact_kind_names_existing_builder_modules():
    from ayt.training.prepare import ensure_artifacts  # noqa: F401  (the modules import cleanly)
    for kind in ("pretrained", "init_file", "feature_map", "fid_classifier", "converged"):
        assert len(code_version(kind)) == 12
    assert "ayt.method.augment" in ARTIFACT_SOURCES["feature_map"]


def test_feature_map_metadata_reaches_the_run_record(tmp_path):
    """ensure_feature_map stores R² per family, the budget in images and the alignment cosines;
    artifact_record (the `artifact.*` params of every run) passes them on."""
    import torch

    from ayt.config import compose_config
    from ayt.data import load_dataset
    from ayt.training.prepare import artifact_record, ensure_feature_map
    cfg = compose_config(["experiment=smoke", f"cache_dir={tmp_path}", "feature_map.iterations=20",
                          "feature_map.channels=[4,4,4,4]", "feature_map.batch_size=32"])
    record = artifact_record(cfg)
    assert "feature_map_r2_geo" not in record
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ensure_feature_map(cfg, ArtifactCache(tmp_path), load_dataset(cfg.dataset), torch.device("cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    record = artifact_record(cfg)
    for key in ("r2", "r2_geo", "r2_clr", "r2_deg", "label_mse", "align_noise", "align_blur", "align_mixup",
                "align_shift", "align_mean"):
        assert isinstance(record[f"feature_map_{key}"], float), key
    assert record["feature_map_train_images"] == 20 * 32
    assert record["feature_map_hash"] == ArtifactCache(tmp_path).path("feature_map", _fm_spec(cfg)).name


def _fm_spec(cfg):
    from ayt.training.prepare import feature_map_spec
    return feature_map_spec(cfg)
