"""The ECT consistency-pair schedule (ALGORITHM §3).

Noise for a whole *global* batch is drawn from a generator keyed by (seed, iteration),
and each worker takes its slice. A sample therefore gets the same t and epsilon whatever
the worker count, so a study's meaning never changes with the hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConsistencyPair:
    """One batch of consistency pairs: x_t = x + t*eps and x_r = x + r*eps (the same eps)."""

    x: Tensor        # [B, C, H, W] clean images
    t: Tensor        # [B] larger time
    r: Tensor        # [B] smaller time; 0 means "the target is x itself"
    x_t: Tensor      # [B, C, H, W]
    x_r: Tensor      # [B, C, H, W]

    @property
    def weight(self) -> Tensor:
        """Per-sample weight w = 1 / (t - r)."""
        return 1.0 / (self.t - self.r)


@dataclass(frozen=True)
class ConsistencySchedule:
    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 256.0
    k: float = 8.0
    b: float = 1.0
    iterations_per_stage: int | None = None  # None: a single stage
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    @classmethod
    def from_config(cls, schedule_cfg, edm_cfg) -> "ConsistencySchedule":
        return cls(
            p_mean=float(schedule_cfg.p_mean), p_std=float(schedule_cfg.p_std),
            q=float(schedule_cfg.q), k=float(schedule_cfg.k), b=float(schedule_cfg.b),
            iterations_per_stage=schedule_cfg.iterations_per_stage,
            sigma_min=float(edm_cfg.sigma_min), sigma_max=float(edm_cfg.sigma_max),
        )

    def stage(self, iteration: int) -> int:
        """Curriculum stage s = iteration // iterations_per_stage."""
        if not self.iterations_per_stage:
            return 0
        return iteration // int(self.iterations_per_stage)

    def r_of_t(self, t: Tensor, stage: int) -> Tensor:
        """r = max(0, t * (1 - q^-(s+1) * (1 + k * sigmoid(-b t))))."""
        shrink = self.q ** (-(stage + 1)) * (1.0 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1.0 - shrink)).clamp_min(0.0)

    def sample_t(self, n: Tensor) -> Tensor:
        """t = exp(P_mean + P_std * n), kept inside [sigma_min, sigma_max] (the model's range)."""
        return (self.p_mean + self.p_std * n).exp().clamp(self.sigma_min, self.sigma_max)

    def pair(self, x: Tensor, n: Tensor, eps: Tensor, iteration: int) -> ConsistencyPair:
        """Build pairs from images x, standard normals n [B] and eps [B, C, H, W]."""
        t = self.sample_t(n)
        r = self.r_of_t(t, self.stage(iteration))
        view = (-1,) + (1,) * (x.dim() - 1)
        return ConsistencyPair(x=x, t=t, r=r, x_t=x + t.view(view) * eps, x_r=x + r.view(view) * eps)


class PairNoise:
    """Counter-based noise: the normals of global batch `iteration` depend only on (seed, iteration).

    Each worker draws the global batch's noise and keeps rows rank::world_size, which are
    exactly the rows Ray Train's DistributedSampler hands that worker.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def draw(self, iteration: int, global_batch: int, shape: tuple[int, ...], rank: int = 0,
             world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Return (n [b], eps [b, *shape]) for this worker's rows of the global batch."""
        self._gen.manual_seed(_mix(self.seed, iteration))
        n = torch.randn(global_batch, generator=self._gen, device=self.device)
        eps = torch.randn((global_batch, *shape), generator=self._gen, device=self.device)
        return n[rank::world_size], eps[rank::world_size]


def _mix(seed: int, iteration: int) -> int:
    """A 63-bit seed from (seed, iteration), so neighbouring runs do not share streams."""
    return (seed * 1_000_003 + iteration * 7_919 + 0x9E3779B97F4A7C15) % (2**63 - 1)


def lr_scale(rule: str, batch_size: int, ref_batch: int) -> float:
    """Learning-rate multiplier for a batch size: none, linear or sqrt scaling."""
    ratio = batch_size / ref_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
