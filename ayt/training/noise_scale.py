"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", Appendix A), measured during training without extra passes.

A gradient averaged over B i.i.d. samples has E|g_B|² = |G|² + tr(Σ)/B, so squared norms at
two batch sizes B_small < B_big give unbiased estimates of both terms. The step already has
both: each micro-batch's gradient (B_small) and the step's gradient (B_big). The two
estimates are EMA-smoothed separately and divided only when read (the ratio of two noisy
estimates is biased and can flip sign; the ratio of their averages is stable).
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor

from ayt.diagnostics import Diagnostic, register_diagnostic
from ayt.metrics import EVAL

NOISE_SCALE = EVAL + "noise_scale"          # B_simple = tr(Σ)/|G|², in samples
GRAD_SQ_NORM = EVAL + "grad_sq_norm"        # |G|², the squared norm of the true gradient
GRAD_TRACE_COV = EVAL + "grad_trace_cov"    # tr(Σ), the per-sample gradient variance


def unbiased_estimates(small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> tuple[Tensor, Tensor]:
    """(|G|², tr(Σ)) from mean squared gradient norms at batch sizes b_small < b_big (Eqs. A.2, A.3)."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """Σ|t|² over a list of tensors, as one 0-d float tensor on their device (no sync)."""
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).square().sum()


@register_diagnostic("noise_scale")
class NoiseScale(Diagnostic):
    """EMA of the |G|² and tr(Σ) estimates, kept on the device: `update` never syncs, the
    loop reads `values` at evaluations (a sync point there anyway). On every rank: each keeps
    its own average of its own micro-batches, averaged over workers when read."""

    observes_gradients = True

    def __init__(self, micro_batches: int = 2, ema: float = 0.9):
        self.micro_batches = micro_batches      # chunks per step when the step has no accumulation
        self.decay = ema
        self.average: Tensor | None = None      # [|G|², tr(Σ)], EMA without bias correction
        self.updates = 0
        self._grads: MicroBatchGradients | None = None     # the current step's, between begin and end

    @classmethod
    def validate(cls, cfg, key: str) -> None:
        """The split needs equal micro-batches of >= 1 image (a mean of unequal chunk means is
        not the batch mean, and B_small must be one number)."""
        from ayt.config import _number
        from ayt.errors import ConfigError
        _number(cfg, f"{key}.micro_batches", low=2, integer=True)
        _number(cfg, f"{key}.ema", low=0, high=1, high_open=True)
        spec = OmegaConf.select(cfg, key)
        per_worker = int(cfg.batch_size) // int(cfg.scaling.num_workers)
        if spec.enabled and per_worker % int(spec.micro_batches):
            raise ConfigError(f"{key}.micro_batches", f"{spec.micro_batches} does not divide the per-worker batch "
                              f"{per_worker} (batch_size / scaling.num_workers); choose a divisor or set {key}.enabled=false")

    @classmethod
    def create(cls, cfg, spec, data, device) -> "NoiseScale":
        return cls(micro_batches=int(spec.micro_batches), ema=float(spec.ema))

    # The step's gradient hooks: B_small is one micro-batch of this worker, B_big the global batch.
    def begin_step(self, params: list[Tensor], chunks: int) -> None:
        self._grads = MicroBatchGradients(params, chunks)

    def after_backward(self, keep: bool) -> None:
        self._grads.observe(keep=keep)

    def end_step(self, b_small: int, b_big: int) -> None:
        grads, self._grads = self._grads, None
        self.update(grads.small_sq(), squared_norm(grads.grads()), b_small, b_big)

    def evaluate(self, step, iteration: int, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return self.values(reduce)

    def update(self, small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> None:
        estimate = torch.stack(unbiased_estimates(small_sq, big_sq, b_small, b_big))
        self.average = (1 - self.decay) * estimate if self.average is None else \
            self.decay * self.average + (1 - self.decay) * estimate
        self.updates += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run continues its average instead of restarting it."""
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.updates = state.get("average"), int(state.get("updates", 0))

    def estimate(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> tuple[float, float]:
        """Bias-corrected (|G|², tr(Σ)); `reduce` averages them over workers. Both estimates are
        linear in the small-batch norm, so the mean of the workers' EMAs is the EMA of the
        estimate from the workers' mean norm."""
        if self.average is None:
            return float("nan"), float("nan")
        g2, trace = reduce(self.average / (1 - self.decay ** self.updates)).tolist()
        return g2, trace

    def values(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> dict[str, float]:
        """The metrics to log; B_simple only where |G|² > 0 (early or noisy estimates can be ≤ 0)."""
        g2, trace = self.estimate(reduce)
        out = {GRAD_SQ_NORM: g2, GRAD_TRACE_COV: trace}
        if g2 > 0:
            out[NOISE_SCALE] = trace / g2
        return out


class MicroBatchGradients:
    """Squared norms of each micro-batch's mean gradient, read off the accumulated `.grad`.

    The step divides every micro-batch loss by the number of chunks k, so after micro-batch i
    the accumulated gradient is a_i = a_{i-1} + g_i / k: g_i = k (a_i - a_{i-1}). Costs one
    gradient copy per micro-batch that another local one follows (none for the last)."""

    def __init__(self, params: list[Tensor], chunks: int):
        self.params, self.chunks = params, chunks
        self.previous: list[Tensor] | None = None
        self.squares: list[Tensor] = []

    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def observe(self, keep: bool) -> None:
        """After a micro-batch's backward whose gradient is still this worker's own (not
        all-reduced); `keep`: another such micro-batch follows."""
        grads = self.grads()
        diff = grads if self.previous is None else torch._foreach_sub(grads, self.previous)
        self.squares.append(squared_norm(diff) * self.chunks ** 2)
        self.previous = [g.detach().clone() for g in grads] if keep else None

    def small_sq(self) -> Tensor:
        return torch.stack(self.squares).mean()
