"""The arithmetic of a run, said out loud: one policy per value of `precision`, applied by one
function in every process that trains (the single-process loop, each Ray Train worker, each
Tune trial process) and recorded with the run's params.

PyTorch's defaults are neither the papers' arithmetic nor the fast one: on Ampere and later
GPUs convolutions run in TF32 (cuDNN's flag is on) while matmuls stay in IEEE fp32, and the
cuDNN autotuner is off. EDM and edm2 switch TF32 off explicitly and ECT makes it a flag; all
three turn `cudnn.benchmark` on. Here every flag is set from the config, never left to the
default:

  fp32  strict IEEE fp32 for matmuls and convolutions (TF32 off for both): the anchors'
        arithmetic (EDM, ECT, AYT train in fp32)
  tf32  fp32 tensors, matmuls and convolutions on TF32 tensor cores (Ampere or newer; a
        10-bit mantissa for the products, fp32 accumulation); no effect on the CPU
  bf16  the U-Net's forward passes under bf16 autocast; everything outside it (the loss, its
        feature map, the EMA, sampling, FID) as tf32

`cudnn_benchmark` (config, default true as in EDM/edm2/ECT) lets cuDNN time its algorithms for
each new input shape and keep the fastest: faster for a fixed batch shape, not bitwise
repeatable from run to run. CPU runs are unaffected by the TF32 and cuDNN flags.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

PARAM_PREFIX = "torch."       # run params: torch.matmul_allow_tf32, torch.cudnn_benchmark, ...


@dataclass(frozen=True)
class Precision:
    """What one `precision` value sets."""

    name: str
    tf32: bool                              # TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN)
    autocast_dtype: torch.dtype | None      # the U-Net's forward passes under autocast to this dtype
    meaning: str                            # one line for the usage text and the README

    @property
    def matmul_precision(self) -> str:
        """torch.set_float32_matmul_precision's value: "highest" keeps IEEE fp32, "high" allows TF32."""
        return "high" if self.tf32 else "highest"

    def settings(self, cudnn_benchmark: bool) -> dict[str, Any]:
        """The process-wide settings this policy makes, named as they are logged."""
        return {"matmul_allow_tf32": self.tf32, "cudnn_allow_tf32": self.tf32,
                "float32_matmul_precision": self.matmul_precision, "cudnn_benchmark": bool(cudnn_benchmark),
                "autocast": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "off"}

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the U-Net's forward passes run in (a no-op unless the policy autocasts)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", tf32=False, autocast_dtype=None, meaning="strict IEEE fp32, TF32 off (the papers' arithmetic)"),
    Precision("tf32", tf32=True, autocast_dtype=None, meaning="fp32 tensors on TF32 tensor cores (Ampere+)"),
    Precision("bf16", tf32=True, autocast_dtype=torch.bfloat16,
              meaning="U-Net forward passes under bf16 autocast, the rest as tf32"),
)}


def apply_precision(name: str, cudnn_benchmark: bool = True) -> dict[str, Any]:
    """Set torch's TF32 switches, fp32 matmul precision and cuDNN autotuner for policy `name`
    in this process; returns what is now in effect (`effective_settings`)."""
    policy = PRECISIONS[name]
    torch.backends.cuda.matmul.allow_tf32 = policy.tf32
    torch.backends.cudnn.allow_tf32 = policy.tf32
    torch.set_float32_matmul_precision(policy.matmul_precision)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return effective_settings(name)


def effective_settings(name: str) -> dict[str, Any]:
    """The settings as torch reports them now (the autocast dtype is the policy's: the step
    enters it around each forward pass)."""
    policy = PRECISIONS[name]
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "autocast": policy.settings(False)["autocast"]}


def check_applied(cfg: Any) -> None:
    """Raise unless this process runs with `cfg`'s policy in effect: a training path that
    skipped `ayt.training.prepare.configure_torch` would train with torch's defaults while its
    run params name the policy."""
    name = str(cfg.precision)
    expected = PRECISIONS[name].settings(bool(cfg.get("cudnn_benchmark", True)))
    live = effective_settings(name)
    wrong = {key: live[key] for key in expected if live[key] != expected[key]}
    if wrong:
        raise RuntimeError(f"precision={name}: this process runs with {wrong}, not the policy's "
                           f"{ {key: expected[key] for key in wrong} }; configure_torch(cfg) was not called here")


def precision_params(cfg: Any) -> dict[str, Any]:
    """The policy's settings for a config, as run params (`torch.<setting>`)."""
    settings = PRECISIONS[str(cfg.precision)].settings(bool(cfg.get("cudnn_benchmark", True)))
    return {PARAM_PREFIX + key: value for key, value in settings.items()}


@contextlib.contextmanager
def preserved_backend_flags():
    """Restore the flags `apply_precision` sets on exit (tests, benchmarks)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cudnn.benchmark = saved[3]
