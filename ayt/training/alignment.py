"""How well a loss's step points at the pixel error: the alignment cosines.

With the normalised gradient every loss sends each sample a unit-length output gradient
(ALGORITHM §4), so how far one step moves a prediction toward its target depends only on
the direction: the cosine between −∂loss/∂pred and the pixel error (target − pred). It is
1 for pseudo-Huber with c = 0 and below 1 for MFD, by how much depending on the feature
map and on the kind of error. Each error type below corrupts real images (the targets)
into predictions with a typical error of one kind; the strengths are fixed here so the
numbers of two feature maps are comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ayt.method.augment import GaussianBlur

NOISE_STD = 0.1        # noise: pred = x + NOISE_STD·ε (images in [-1, 1])
BLUR_SIGMA = 1.0       # blur: Gaussian blur of σ = 1 pixel (5 taps)
MIX_WEIGHT = 0.3       # mixup and mean: pred = x + MIX_WEIGHT·(other − x)

# name -> (targets [B, C, H, W], generator) -> predictions of the same shape
ERRORS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {}


def register_error(name: str):
    def add(fn):
        ERRORS[name] = fn
        return fn
    return add


@register_error("noise")
def _noise(x: Tensor, gen: torch.Generator) -> Tensor:
    return x + NOISE_STD * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)


@register_error("blur")
def _blur(x: Tensor, gen: torch.Generator) -> Tensor:
    blur = GaussianBlur({"blur_max": BLUR_SIGMA, "blur_kernel": 5})
    return blur.apply(x, {"sigma": torch.full((x.shape[0],), BLUR_SIGMA, device=x.device)})


@register_error("mixup")
def _mixup(x: Tensor, gen: torch.Generator) -> Tensor:
    return x + MIX_WEIGHT * (x.roll(1, dims=0) - x)          # another image of the batch


@register_error("shift")
def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    return x.roll(1, dims=-1)                                # one pixel to the right (wrapping)


@register_error("mean")
def _toward_mean(x: Tensor, gen: torch.Generator) -> Tensor:
    return x + MIX_WEIGHT * (x.mean(dim=0, keepdim=True) - x)  # toward the batch's mean image


def step_cosines(loss: Callable[[Tensor, Tensor, int], dict[str, Tensor]], pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample cosine ``[B]`` between −∂loss/∂pred (the direction a step moves pred) and
    target − pred; `loss` is a `PairLoss` (``loss(pred, target, iteration)['loss']`` per sample)."""
    pred = pred.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(pred, target.detach(), 0)["loss"].sum(), pred)
    return torch.nn.functional.cosine_similarity((-grad).flatten(1), (target - pred.detach()).flatten(1), dim=1)


def alignment_cosines(loss: Callable[[Tensor, Tensor, int], dict[str, Tensor]], images: Tensor,
                      batch_size: int = 128, seed: int = 0) -> dict[str, float]:
    """Mean step cosine of `loss` for each error type in `ERRORS`, on `images` ``[N, C, H, W]``
    in [-1, 1] (N >= 2: mixup and the mean image need other images), as ``{name: cosine}``."""
    if images.shape[0] < 2:
        raise ValueError(f"alignment needs at least 2 images, got {images.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, corrupt in ERRORS.items():
        total, count = 0.0, 0
        for start in range(0, images.shape[0], batch_size):
            target = images[start : start + batch_size]
            if target.shape[0] < 2:                          # a last batch of one has no partner image
                continue
            cos = step_cosines(loss, corrupt(target, gen), target)
            total, count = total + float(cos.sum()), count + cos.numel()
        out[name] = total / count
    return out
