"""One- and two-step consistency samplers (ALGORITHM §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample_one_step(denoiser: nn.Module, z: Tensor, sigma_max: float) -> Tensor:
    """x = D(sigma_max * z, sigma_max)."""
    sigma = torch.full((z.shape[0],), sigma_max, device=z.device)
    return denoiser(z * sigma_max, sigma)


@torch.no_grad()
def sample_two_step(denoiser: nn.Module, z: Tensor, z2: Tensor, sigma_max: float, t_mid: float,
                    sigma_min: float) -> Tensor:
    """x1 = D(sigma_max z, sigma_max); x = D(x1 + sqrt(t_mid^2 - sigma_min^2) z', t_mid)."""
    return second_step(denoiser, sample_one_step(denoiser, z, sigma_max), z2, t_mid, sigma_min)


@torch.no_grad()
def second_step(denoiser: nn.Module, x1: Tensor, z2: Tensor, t_mid: float, sigma_min: float) -> Tensor:
    """The 2-step sampler's second step from its first step's output x1 (unclamped): an
    evaluation that already has the 1-step samples pays one network pass, not two."""
    sigma = torch.full((x1.shape[0],), t_mid, device=x1.device)
    return denoiser(x1 + math.sqrt(t_mid**2 - sigma_min**2) * z2, sigma)


@torch.no_grad()
def sample_in_batches(fn, *noises: Tensor, batch_size: int) -> Tensor:
    """Run a sampler over a large fixed noise set in chunks; returns all samples."""
    chunks = [fn(*(n[i:i + batch_size] for n in noises)) for i in range(0, noises[0].shape[0], batch_size)]
    return torch.cat(chunks).clamp(-1.0, 1.0)
