"""EDM preconditioning with the consistency-model σ_min shift (ALGORITHM §1).

``D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))`` with c_skip = 1 and c_out = 0
at σ = σ_min, so ``D(x, σ_min) == x`` bitwise: the consistency boundary condition holds
by construction, not by training.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ayt.errors import ConfigError
from ayt.networks.unet import UNet

# Coefficients are computed in float32 whatever the input dtype: σ arrives as float32
# (or is rounded to it) and σ − σ_min then subtracts two identical float32 numbers at
# σ = σ_min, which is exactly 0. In float64, a float32 σ of 0.002 minus the float64
# constant 0.002 would not be 0.
COEF_DTYPE = torch.float32


class Coefficients(NamedTuple):
    """The four EDM coefficients, each [B] in float32."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


class EDMPrecond(nn.Module):
    """The denoiser D(x, σ): EDM preconditioning around a :class:`UNet` it builds itself."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        sigma_min: float = 0.002,  # smallest noise level; D(x, sigma_min) = x
        sigma_max: float = 80.0,  # largest noise level (1-step sampling starts here)
        sigma_data: float = 0.5,  # standard deviation of the data
        **unet_kwargs: Any,  # UNet options (model_channels, channel_mult, ...)
    ):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.unet = UNet(img_resolution, in_channels=img_channels, out_channels=img_channels, **unet_kwargs)

    def coefficients(self, sigma: Tensor | float, batch: int | None = None, device=None) -> Coefficients:
        """EDM coefficients (ALGORITHM §1) for σ broadcastable to [batch], in float32."""
        sigma = torch.as_tensor(sigma, device=device).to(COEF_DTYPE).reshape(-1)
        if batch is not None:
            sigma = sigma.expand(batch)
        # A tensor σ_data², so c_skip at σ_min is a float32 y / y (exactly 1); a Python scalar
        # numerator would be computed as reciprocal(y) * y, which need not be 1.
        sd2 = torch.full_like(sigma, self.sigma_data**2)
        shifted = sigma - self.sigma_min  # exactly 0 at σ = σ_min (same float32 on both sides)
        c_skip = sd2 / (shifted**2 + sd2)
        c_out = shifted * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return Coefficients(c_skip, c_out, c_in, c_noise)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x: [B, C, R, R]; sigma: scalar, [B] or [B, 1, 1, 1] -> D(x, σ), same shape and dtype as x.

        The U-Net runs in whatever autocast dtype is active; the skip combination is done
        in float32 so that D(x, σ_min) is x itself.
        """
        c = self.coefficients(sigma, batch=x.shape[0], device=x.device)
        c_skip, c_out, c_in = (v.reshape(-1, 1, 1, 1) for v in (c.c_skip, c.c_out, c.c_in))
        x32 = x.to(COEF_DTYPE)
        f = self.unet(c_in * x32, c.c_noise)
        d = c_skip * x32 + c_out * f.to(COEF_DTYPE)
        return d.to(x.dtype)


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under a DDP (or compile) wrapper."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


def _as_dict(cfg: Mapping | DictConfig | None) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


_UNET_OPTIONS = [
    name
    for name in inspect.signature(UNet.__init__).parameters
    if name not in ("self", "img_resolution", "in_channels", "out_channels")
]
_EDM_OPTIONS = ("sigma_min", "sigma_max", "sigma_data")


def build_denoiser(
    network_cfg: Mapping | DictConfig,
    edm_cfg: Mapping | DictConfig,
    img_resolution: int,
    img_channels: int,
) -> EDMPrecond:
    """Build D from ``cfg.network`` and ``cfg.edm``; unknown or invalid keys fail naming the field."""
    net = _as_dict(network_cfg)
    edm = _as_dict(edm_cfg)
    for key in net:
        if key not in _UNET_OPTIONS:
            raise ConfigError(f"network.{key}", f"unknown option; allowed: {_UNET_OPTIONS}")
    for key in edm:
        if key not in _EDM_OPTIONS:
            raise ConfigError(f"edm.{key}", f"unknown option; allowed: {list(_EDM_OPTIONS)}")
    for key in _EDM_OPTIONS:
        if key in edm and not float(edm[key]) > 0:
            raise ConfigError(f"edm.{key}", f"must be > 0, got {edm[key]}")
    if float(edm.get("sigma_min", 0.002)) >= float(edm.get("sigma_max", 80.0)):
        raise ConfigError("edm.sigma_min", f"must be < edm.sigma_max, got {edm.get('sigma_min')}")
    return EDMPrecond(img_resolution, img_channels, **edm, **net)
