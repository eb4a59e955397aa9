"""Can this process train on the GPU the config asks for? torch must see CUDA (a CPU-only
wheel, or one built for another driver, silently falls back to the CPU: Ray Train's
`get_device()` then returns the CPU and a study runs for days at CPU speed), and the GPU
must do the chosen precision in hardware.

One `CudaReport`, made where training runs and judged by `check_cuda`: by every Ray Train
worker and Tune trial process at start, by a plain run's config check, and by the preflight
through a one-task probe on a GPU node (`probe_cuda`), before any trial starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ayt.errors import ConfigError

# The compute capability a precision needs in hardware, and what to use below it. bf16 and
# TF32 tensor cores both arrive with Ampere (8.0); on older GPUs torch emulates bf16 (slowly)
# and ignores the TF32 switches, so the run would not compute what its config says.
NATIVE_PRECISION: dict[str, tuple[tuple[int, int], str]] = {
    "bf16": ((8, 0), "fp32"),
    "tf32": ((8, 0), "fp32"),
}


class GPUUnavailableError(ConfigError):
    """The config asks for a GPU (or a precision) this process's torch cannot provide."""


def cuda_available() -> bool:
    """Whether torch in this process can use CUDA (the query a test replaces)."""
    import torch
    return torch.cuda.is_available()


def gpu_properties(index: int) -> tuple[str, tuple[int, int]]:
    """Name and (major, minor) compute capability of CUDA device `index` (the query a test replaces)."""
    import torch
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor)


def cuda_index(device: str) -> int | None:
    """The CUDA device `device` selects in this process (auto: the current one, if torch sees
    CUDA), None for the CPU or MPS."""
    if device.startswith("cuda"):
        return int(device.partition(":")[2] or 0)
    return 0 if device == "auto" and cuda_available() else None


@dataclass(frozen=True)
class CudaReport:
    """What torch in one process sees: picklable, so a Ray task can send it to the driver."""

    available: bool
    torch: str                           # torch.__version__
    cuda_build: str | None               # torch.version.cuda (None: a CPU-only wheel)
    visible: str | None                  # CUDA_VISIBLE_DEVICES as Ray set it
    host: str
    name: str | None = None              # the GPU's name, where torch sees one
    capability: tuple[int, int] | None = None
    nvml: bool = False                   # pynvml importable: MLflow can log GPU utilisation

    def describe(self) -> str:
        where = f"on {self.host} (CUDA_VISIBLE_DEVICES={self.visible!r})"
        if not self.available:
            build = f"CUDA {self.cuda_build} build" if self.cuda_build else "a CPU-only build"
            return f"torch {self.torch} ({build}) cannot use CUDA {where}"
        major, minor = self.capability or (0, 0)
        return f"torch {self.torch} sees {self.name} (compute capability {major}.{minor}) {where}"


def cuda_report(index: int = 0) -> CudaReport:
    """This process's view of CUDA device `index`."""
    import importlib.util

    import torch
    available = cuda_available()
    name, capability = gpu_properties(index) if available else (None, None)
    return CudaReport(
        available=available, torch=torch.__version__, cuda_build=torch.version.cuda,
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"), host=socket.gethostname(),
        name=name, capability=capability, nvml=importlib.util.find_spec("pynvml") is not None)


def check_cuda(report: CudaReport, cfg: Any, field: str = "scaling.use_gpu") -> str:
    """Raise GPUUnavailableError (naming `field`, or `precision`) unless `report` shows a GPU
    that runs `cfg.precision` natively; a system-metrics run also needs pynvml there for GPU
    utilisation. Returns the line that says what was found."""
    if not report.available:
        raise GPUUnavailableError(field, f"{_shown(cfg_value(cfg, field))} asks for a GPU, but {report.describe()}; "
                                  "check the node's NVIDIA driver (nvidia-smi) and install a CUDA build of torch "
                                  "it supports, or train on the CPU (scaling.use_gpu=false, device=cpu)")
    precision = str(cfg_value(cfg, "precision"))
    if precision in NATIVE_PRECISION and report.capability is not None:
        needed, instead = NATIVE_PRECISION[precision]
        if tuple(report.capability) < needed:
            raise GPUUnavailableError("precision", f"{precision} needs a GPU of compute capability >= "
                                      f"{needed[0]}.{needed[1]} (Ampere or newer), but {report.describe()}; "
                                      f"use precision={instead}")
    if cfg_value(cfg, "tracking.system_metrics") and not report.nvml:
        raise GPUUnavailableError("tracking.system_metrics", f"true, but nvidia-ml-py (pynvml) is not installed "
                                  f"where {report.describe()}, so MLflow would log no GPU utilisation; install "
                                  "the package with its gpu extra (pip install 'ayt[gpu]') or set "
                                  "tracking.system_metrics=false")
    return f"{field}: {report.describe()}"


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def cfg_value(cfg: Any, key: str) -> Any:
    """`cfg`'s value at dotted `key` (None if absent)."""
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def require_cuda(cfg: Any, device: str, field: str) -> str | None:
    """In the process that trains: check the GPU `device` names (None: not a CUDA device).
    `field` is the config key that asked for it (device, or scaling.use_gpu)."""
    index = cuda_index(device)
    if index is None:
        return None
    return check_cuda(cuda_report(index), cfg, field)


def check_training_device(cfg: Any, device: Any) -> str | None:
    """In the process that trains on `device` (a torch.device): a config that asks for a GPU
    (device=cuda..., scaling.use_gpu) needs torch here to use CUDA, and a CUDA device must do
    the precision natively. None: a CPU run that asked for none."""
    asked = str(cfg_value(cfg, "device") or "")
    field = "device" if asked.startswith("cuda") else "scaling.use_gpu"
    if device.type == "cuda":
        return check_cuda(cuda_report(device.index or 0), cfg, field)
    if asked.startswith("cuda") or cfg_value(cfg, "scaling.use_gpu"):
        return check_cuda(cuda_report(0), cfg, field)
    return None


def probe_cuda(cfg: Any, gpus: float, timeout_s: float) -> CudaReport | None:
    """`cuda_report()` from a Ray task that holds `gpus` GPUs (so Ray places it on a GPU node
    and sets CUDA_VISIBLE_DEVICES as for a training worker); None if no GPU node took it within
    `timeout_s` (an autoscaler may still be starting one)."""
    import ray
    task = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(cuda_report)
    ref = task.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return ray.get(ref)
