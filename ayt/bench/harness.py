"""The benchmark harness: timing and its statistics, the machine and the commit, the global
state every benchmark gets back afterwards, and the JSON record (relative paths only)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ayt.bench.registry import Options, get_benchmark
from ayt.precision import preserved_backend_flags
from ayt.training.prepare import resolve_device

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------
# Machine, commit


def loadavg() -> dict[str, float]:
    """os.getloadavg(), named: the 1-, 5- and 15-minute load averages."""
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen}


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model, "cpu_count": os.cpu_count()}
    info["cpus_usable"] = usable_cpus()
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    return info


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit the benchmarked code is at, and whether its code (ayt/, conf/, the pins) differs from it."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    # The code only: `--out studies/benchmarks/results.json` rewrites a tracked file while it runs.
    from ayt.provenance import CODE_PATHS
    status = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def torch_info(device: torch.device) -> dict[str, Any]:
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "device": str(device),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve(device: str) -> torch.device:
    return resolve_device(device)


# ---------------------------------------------------------------------------------------
# Timing and statistics


_THREADS_SEEN: set[int] = set()     # torch.get_num_threads() at every timed call of the current benchmark


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (the timer must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def summarize(times: list[float]) -> dict[str, Any]:
    """Median and spread of repeated timings, in seconds."""
    ordered = sorted(times)
    q1, q3 = (_quantile(ordered, 0.25), _quantile(ordered, 0.75))
    return {"median_s": statistics.median(ordered), "iqr_s": q3 - q1, "min_s": ordered[0], "max_s": ordered[-1],
            "repeats": len(ordered), "times_s": [round(t, 6) for t in times]}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default)."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_interleaved(fns: dict[str, Callable[[int], Any]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Call every fn(i) `warmup` times untimed, then `repeats` timed rounds, round-robin.

    `i` is the round index, the same for every variant of a round (a step's iteration:
    every loss sees the same noise draw).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            _THREADS_SEEN.add(torch.get_num_threads())
            start = time.perf_counter()
            fn(i)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return a["median_s"] / b["median_s"]


def round_ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Spread of the per-round ratio a/b (both measured in the same round)."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def target(value: float, op: str, bound: float) -> dict[str, Any]:
    """A target entry of a record: the value, the bound as text (`<= 1.5`), and whether it is met."""
    met = value <= bound if op == "<=" else value >= bound if op == ">=" else None
    if met is None:
        raise ValueError(f"unknown comparison {op!r}")
    return {"value": value, "target": f"{op} {bound}", "met": bool(met)}


# ---------------------------------------------------------------------------------------
# Global state: what one benchmark must not leave behind for the next


@contextlib.contextmanager
def preserved_state() -> Iterator[None]:
    """Restore torch's intra-op thread count and default dtype, the precision policy's backend
    flags (TF32, fp32 matmul precision, cuDNN autotuner), the RNG states (torch CPU and
    CUDA, Python, NumPy), the environment variables and the working directory on exit.
    (The inter-op thread count can be set only once per process: nothing changes it here.)"""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    environ = dict(os.environ)
    cwd = os.getcwd()
    try:
        with preserved_backend_flags():
            yield
    finally:
        os.chdir(cwd)
        for key in [k for k in os.environ if k not in environ]:
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


# ---------------------------------------------------------------------------------------
# Paths in records: relative, or a placeholder


_PLACEHOLDERS: list[tuple[str, str]] = []      # (absolute path, placeholder) of the current benchmark

# An absolute path left in a string: a '/' that starts a path component, not one inside a
# word, a relative path, a fraction or a placeholder ("a/b", "1/2", "<tmp>/x").
_ABSOLUTE = re.compile(r"(?<![\w.~<>/\-])/(?:[^\s/'\"`,;()\[\]{}]+/)*[^\s/'\"`,;()\[\]{}]+")


def register_path(path: str | os.PathLike, placeholder: str) -> None:
    """Write `path` (and anything under it) as `placeholder` in the records of this benchmark."""
    for variant in {str(path), os.path.realpath(path)}:
        _PLACEHOLDERS.append((variant.rstrip("/"), placeholder))


@contextlib.contextmanager
def temp_dir(prefix: str = "ayt-bench-", placeholder: str = "<tmp>") -> Iterator[Path]:
    """A temporary directory, removed afterwards, written as `placeholder` in the record."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        register_path(tmp, placeholder)
        yield Path(tmp)


def relative_paths(value: Any) -> Any:
    """Every string in `value` with absolute paths replaced: registered ones by their
    placeholder, the repository's by paths relative to it, the system temp dir by `<tmp>`,
    the home directory by `~`, and any other by `<abs>/<its last component>`."""
    known = sorted(_PLACEHOLDERS + [(str(REPO_ROOT), "."), (os.path.realpath(tempfile.gettempdir()), "<tmp>"),
                                    (tempfile.gettempdir(), "<tmp>"), (str(Path.home()), "~")],
                   key=lambda item: -len(item[0]))
    known = [(path, mark) for path, mark in known if path not in ("", "/")]

    def fix(text: str) -> str:
        for path, mark in known:
            if path not in text:
                continue
            if mark == ".":                                 # under the repository: relative to it
                text = text.replace(path + "/", "")
            text = re.sub(re.escape(path) + r"(?![\w.\-])", mark, text)
        return _ABSOLUTE.sub(lambda m: "<abs>/" + m.group(0).rsplit("/", 1)[-1], text)

    if isinstance(value, dict):
        return {fix(str(k)): relative_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v) for v in value]
    if isinstance(value, str):
        return fix(value)
    return value


# ---------------------------------------------------------------------------------------
# Records


def run_benchmark(name: str, opts: Options) -> dict[str, Any]:
    """One benchmark's JSON record (commit, machine, torch, options, config, results), run
    with the global state restored afterwards."""
    fn = get_benchmark(name)
    _PLACEHOLDERS.clear()
    _THREADS_SEEN.clear()
    with preserved_state():
        if opts.threads:
            torch.set_num_threads(int(opts.threads))
        device = resolve(opts.device)
        torch_start = torch_info(device)
        machine = machine_info()
        load_start = loadavg()
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        body = fn(opts)
        wall = time.perf_counter() - start
        threads_end = torch.get_num_threads()
    record = {"benchmark": name, "started": started, "wall_s": wall, "git": git_info(),
              "machine": {**machine, "loadavg_start": load_start, "loadavg_end": loadavg()},
              "torch": {**torch_start, "threads_timed": sorted(_THREADS_SEEN), "threads_end": threads_end},
              "options": asdict(opts), **body}
    record = relative_paths(_jsonable(record))
    _PLACEHOLDERS.clear()
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)


def write_records(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """A `.json` file gets one JSON list; any other name gets JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
