"""The consistency-training step: the one function both the single-process loop and
every Ray Train worker call (batch -> pairs -> loss -> backward -> optimizer -> EMA)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ayt.diagnostics import Diagnostic
from ayt.method.ema import EMA
from ayt.method.losses import PairLoss
from ayt.method.schedule import ConsistencyPair, ConsistencySchedule, PairNoise
from ayt.networks.precond import unwrap  # noqa: F401 - re-exported: the loop and the benchmarks import it here
from ayt.precision import PRECISIONS


def dropout_replay(device: torch.device):
    """Fork the RNG of `device`: passes inside and right after see the same random stream,
    so the target and the prediction share their dropout mask (ALGORITHM §3)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def consistency_terms(net: nn.Module, loss: PairLoss, pair: ConsistencyPair, iteration: int,
                      sigma_min: float, autocast: contextlib.AbstractContextManager) -> dict[str, Tensor]:
    """Per-sample loss terms of D(x_t, t) against stopgrad(D(x_r, r)) (x itself where r = 0)."""
    with dropout_replay(pair.x.device), torch.no_grad(), autocast:
        target = net(pair.x_r, pair.r.clamp_min(sigma_min)).float()
    target = torch.where((pair.r > 0).view(-1, *([1] * (pair.x.dim() - 1))), target, pair.x)
    with autocast:
        pred = net(pair.x_t, pair.t).float()
    return loss(pred, target, iteration)


@dataclass
class ConsistencyStep:
    """Everything one optimizer step needs; call it with this worker's batch."""

    net: nn.Module                 # the EDM-preconditioned denoiser, possibly DDP-wrapped
    loss: PairLoss
    schedule: ConsistencySchedule
    noise: PairNoise
    optimizer: torch.optim.Optimizer
    ema: EMA
    global_batch: int              # images per optimizer step over all workers
    rank: int = 0
    world_size: int = 1
    accum_steps: int = 1           # micro-batches per worker per step
    precision: str = "fp32"        # a key of ayt.precision.PRECISIONS: bf16 autocasts the forward passes
    hooks: Sequence[Diagnostic] = ()  # diagnostics that read the micro-batch gradients (ayt.diagnostics)

    def __post_init__(self):
        # First iteration whose loss was not finite (-1: none); a device tensor, read at log time.
        self.first_bad_iteration: Tensor | None = None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The U-Net's forward passes run inside this: the precision policy's autocast, if any."""
        return PRECISIONS[self.precision].autocast(device)

    @property
    def chunks(self) -> int:
        """Micro-batches per step: the accumulation, or the split the hooks need when there is none."""
        return max([h.micro_batches for h in self.hooks], default=1) if self.accum_steps == 1 else self.accum_steps

    def __call__(self, x: Tensor, iteration: int) -> dict[str, Tensor]:
        n, eps = self.noise.draw(iteration, self.global_batch, tuple(x.shape[1:]), self.rank, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        chunks = list(zip(x.chunk(self.chunks), n.chunk(self.chunks), eps.chunk(self.chunks)))
        distributed = hasattr(self.net, "no_sync")
        # Under DDP the last micro-batch's backward all-reduces: only the others are this worker's own.
        local = len(chunks) - distributed
        for hook in self.hooks:
            hook.begin_step(self._params(), len(chunks))
        for i, (xc, nc, ec) in enumerate(chunks):
            pair = self.schedule.pair(xc, nc, ec, iteration)
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not distributed else self.net.no_sync()
            with sync:
                terms = consistency_terms(self.net, self.loss, pair, iteration, self.schedule.sigma_min,
                                          self.autocast(x.device))
                loss = (pair.weight * terms["loss"]).mean() / len(chunks)
                loss.backward()
            for hook in self.hooks:
                if i < local:
                    hook.after_backward(keep=i + 1 < local)
            totals["loss"] = totals.get("loss", 0.0) + loss.detach()
            for key, value in terms.items():
                if key != "loss":
                    totals[key] = totals.get(key, 0.0) + value.mean() / len(chunks)
        for hook in self.hooks:
            hook.end_step(len(chunks[0][0]), self.global_batch)
        self.optimizer.step()
        self.ema.update(unwrap(self.net), self.global_batch)
        self._track_non_finite(totals["loss"], iteration)
        return totals

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _track_non_finite(self, loss: Tensor, iteration: int) -> None:
        """Remember the first non-finite iteration without a host-device sync."""
        if self.first_bad_iteration is None:
            self.first_bad_iteration = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss) & (self.first_bad_iteration < 0)
        self.first_bad_iteration = torch.where(bad, torch.full_like(self.first_bad_iteration, iteration),
                                               self.first_bad_iteration)
