"""The benchmark registry and the options every benchmark reads (`ayt.bench` re-exports both).

Its own module so that `ayt.bench.harness` and the benchmark modules import it without
importing the package that delegates to the harness."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

BENCHMARKS: dict[str, Callable[["Options"], dict[str, Any]]] = {}
ALL = ("step", "switches", "mfd", "ray", "fid", "roofline", "front_door", "report_scale", "numerics")
# Benchmarks `all` leaves out: `gpu` needs a CUDA GPU (and exits 2 without one).
EXTRA = ("gpu",)

# The module that registers each benchmark (imported on first use: `ray` would shadow the
# package of the same name, so its module is `ray_overhead`).
MODULES = {"step": "step", "switches": "switches", "mfd": "mfd", "ray": "ray_overhead", "fid": "fid",
           "roofline": "roofline", "front_door": "front_door", "report_scale": "report_scale",
           "numerics": "numerics", "gpu": "gpu"}


def benchmark(name: str):
    """Register `fn(opts) -> dict` as the benchmark `name`."""
    def wrap(fn):
        BENCHMARKS[name] = fn
        return fn
    return wrap


def get_benchmark(name: str) -> Callable[["Options"], dict[str, Any]]:
    if name not in BENCHMARKS and name in MODULES:
        importlib.import_module(f"ayt.bench.{MODULES[name]}")
    return BENCHMARKS[name]


@dataclass
class Options:
    """What every benchmark reads; the CLI flags of the same names set them."""

    repeats: int = 5                 # timed calls per variant
    warmup: int = 1                  # untimed calls per variant first
    threads: int | None = None       # torch intra-op threads (None: torch's default)
    device: str = "auto"             # auto | cpu | cuda | mps
    quick: bool = False              # tiny networks and batches (tests, a dry run of the harness)
    compile: bool = False            # switches: also measure torch.compile (minutes of compilation)
    lpips_weights: tuple[str, str] | None = None   # (vgg16.pth, lpips vgg.pth): time the LPIPS loss
    ray_iterations: int = 150        # ray: optimizer steps of the small trial
    ray_threads: int = 1             # ray: cpu_threads of the trial, both paths (a Ray worker reserves 1 CPU)
    front_door_args: tuple[str, ...] = ()   # front_door: extra overrides (shrink it: study.budget.amount=640 ...)
    front_door_timeout_s: float | None = None   # front_door: kill the study after this long (None: never)
    seed: int = 0
