"""Probes of the training step: what a step does besides its arithmetic, and checks of the MFD
loss against a plain reference form. Used by the benchmarks (`ayt.bench`) and the tests;
nothing here runs during training.

  scan_host_syncs         every op of one step call that reads a tensor's value back to the host
  count_step_flops        FLOPs of one step call (and of the MFD loss's feature-map passes)
  naive_mfd_terms         MFD written the plain way (ALGORITHM §4), the reference of the optimised loss
  gradient_wrt_prediction d sum(loss) / d prediction, the gradient a loss sends into the network
  mfd_gradients           both MFD forms' gradients w.r.t. the prediction, and whether they agree
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ayt.method.losses import gradient_wrt_prediction  # noqa: F401 - re-exported for the benchmarks and tests

# Gradient equality of the two MFD forms, on unit-norm per-sample directions (float32).
MFD_RTOL, MFD_ATOL = 1e-4, 1e-6

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "equal", "repeat_interleave")

_PACKAGE = Path(__file__).resolve().parents[1]      # ayt/: call sites are reported relative to its parent


def scan_host_syncs(step, x: Tensor, iteration: int = 0) -> dict[str, Any]:
    """Run one step and list every op that reads a tensor's value back to the host.

    `aten._local_scalar_dense` is what `.item()`, `float(t)`, `bool(t)` and `.tolist()`
    become; `nonzero`, `masked_select`, `unique`... need the result size on the host. On a
    GPU each is a sync point. Adam's per-parameter step counter is a CPU tensor on every
    device (capturable=False), so reading it is not one; those are counted apart. Each
    sync is keyed by the op and the innermost call site inside the `ayt` package.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    step(x, iteration)      # optimizer state (and its step counters) exists from here on
    counters = [s["step"] for s in step.optimizer.state.values() if torch.is_tensor(s.get("step"))]
    here = _PACKAGE

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.optimizer_counter_reads = 0
            self.syncs: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNC_OPS:
                if name == "_local_scalar_dense" and any(args[0] is c for c in counters):
                    self.optimizer_counter_reads += 1
                else:
                    frames = [f for f in traceback.extract_stack()[:-1] if str(here) in f.filename]
                    site = f"{Path(frames[-1].filename).relative_to(here.parent)}:{frames[-1].lineno}" if frames else "?"
                    key = f"aten.{name} at {site}"
                    self.syncs[key] = self.syncs.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    recorder = Recorder()
    with recorder:
        step(x, iteration + 1)
    return {"device_sync_ops": recorder.syncs, "device_syncs": sum(recorder.syncs.values()),
            "optimizer_step_counter_reads": recorder.optimizer_counter_reads,
            "method": "TorchDispatchMode over one step call: aten ops " + ", ".join(SYNC_OPS)}


def count_step_flops(step, x: Tensor, mfd_loss: nn.Module | None = None) -> dict[str, int]:
    """FLOPs of one step: the U-Net's forward + backward (FlopCounterMode over one whole call
    of `step`, a pseudo-Huber step: target pass, prediction pass, backward) and, given an MFD
    loss module, its feature map's passes.

    FlopCounterMode's module tracker cannot run inside `torch.autograd.grad` (which the MFD
    loss uses), so the feature-map part is counted on the same computation written with
    `.backward()`: `manifold_feature_distance` itself, then the input-gradient backward.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from ayt.method.losses import manifold_feature_distance
    step(x, 0)                                  # optimizer state exists: the counted call is a steady one
    with FlopCounterMode(display=False) as counter:
        step(x, 1)
    counts = {"unet_forward_backward": counter.get_total_flops(), "feature_map_mfd": 0}
    if mfd_loss is not None:
        a = torch.rand(x.shape, device=x.device).requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            manifold_feature_distance(mfd_loss.feature_map, a, torch.rand_like(x), mfd_loss.eps).sum().backward()
        counts["feature_map_mfd"] = counter.get_total_flops()
    return counts


def naive_mfd_terms(feature_map: nn.Module, pred: Tensor, target: Tensor, eps: float = 1e-5) -> dict[str, Tensor]:
    """MFD in normalised-gradient form written the plain way (ALGORITHM §4), for comparison only.

    dist(a, b) = sum_layers sum_channels rho(|phi_lc(a) - phi_lc(b)|_2 over space),
    rho(u) = sqrt(u^2 + eps^2) - eps; g = d dist / d a; g_hat = g / max(|g|, 1e-5);
    loss = 1/2 |a - stopgrad(a - g_hat)|^2. `feature_map` has trainable parameters, the
    target goes through its own forward pass with autograd recording, the norm is
    `torch.linalg.vector_norm`, and g comes from a plain `.backward()` (which also fills
    the feature map's parameter gradients, thrown away here).
    """
    a = pred.detach().clone().requires_grad_(True)
    feats_a = feature_map.features(a)
    feats_t = feature_map.features(target)
    dist = torch.zeros(a.shape[0], device=a.device)
    for fa, ft in zip(feats_a, feats_t):
        u = torch.linalg.vector_norm(fa - ft, dim=(2, 3))                  # [B, channels]
        dist = dist + (torch.sqrt(u ** 2 + eps ** 2) - eps).sum(dim=1)
    dist.sum().backward()
    feature_map.zero_grad(set_to_none=True)
    g = a.grad
    g_hat = g / g.flatten(1).norm(dim=1).clamp_min(1e-5).view(-1, 1, 1, 1)
    moved = (pred - g_hat).detach()
    return {"loss": 0.5 * (pred - moved).flatten(1).square().sum(1), "dist": dist.detach()}


def mfd_gradients(optimised: nn.Module, naive_fm: nn.Module, pred: Tensor, target: Tensor,
                  rtol: float = MFD_RTOL, atol: float = MFD_ATOL) -> dict[str, Any]:
    """Gradients w.r.t. the prediction of the optimised MFD loss (`ManifoldFeatureDistance`)
    and of `naive_mfd_terms` on `naive_fm` (meant to hold the same weights), and whether they agree."""
    g_opt = gradient_wrt_prediction(lambda p: optimised(p, target, 0), pred)
    g_naive = gradient_wrt_prediction(lambda p: naive_mfd_terms(naive_fm, p, target, optimised.eps), pred)
    diff = (g_opt - g_naive).abs()
    return {"optimised": g_opt, "naive": g_naive, "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / g_naive.abs().clamp_min(1e-12)).max()),
            "allclose": bool(torch.allclose(g_opt, g_naive, rtol=rtol, atol=atol)),
            "tolerance": {"rtol": rtol, "atol": atol}}
