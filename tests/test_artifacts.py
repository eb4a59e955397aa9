"""The shared-artifact cache under concurrent use by real processes (issue 12, point 7)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from ayt.artifacts import ArtifactCache

SPEC = {"kind": "test", "size": 3}
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
    path = ArtifactCache(root).get_or_build("thing", SPEC, lambda d: _slow_build(d, log))
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
    final = ArtifactCache(root).path("thing", SPEC)
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
