"""Losses on a consistency pair (ALGORITHM §4), one small class each, chosen by name.

Every loss returns per-sample terms; the step multiplies by w = 1/(t - r) and averages.
A new loss is one class registered here plus one yaml in conf/loss/. A loss that needs a
frozen network names it in `frozen` (a key of `FROZEN`); a new frozen network is one
`FROZEN` entry here, plus its artifact kind in `ayt.artifacts` if it is built and cached.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ayt.errors import ConfigError

LOSSES: dict[str, type["PairLoss"]] = {}


def register_loss(name: str):
    def wrap(cls):
        cls.name = name
        cls.needs_feature_map = "feature_map" in cls.frozen     # for callers that ask only that
        LOSSES[name] = cls
        return cls
    return wrap


@dataclass(frozen=True)
class FrozenNetwork:
    """A frozen network some loss needs: the artifact kind it is built as (None: files the
    loss config names) and how a run loads it."""

    artifact: str | None
    load: str       # "module:function"; fn(cfg_loss, artifact path or None, device) -> frozen nn.Module

    def loader(self) -> Callable[[Any, str | None, torch.device], nn.Module]:
        """The load function, imported on first use (this module stays free of the networks)."""
        module, _, name = self.load.partition(":")
        return getattr(importlib.import_module(module), name)


FROZEN: dict[str, FrozenNetwork] = {
    "feature_map": FrozenNetwork("feature_map", "ayt.networks.feature_map:load_frozen"),   # MFD's φ, trained and cached
    "lpips": FrozenNetwork(None, "ayt.networks.lpips:load_frozen"),                       # VGG16 + LPIPS files
}


class LossResources:
    """The frozen networks a loss may ask for, by `FROZEN` name, each loaded when asked."""

    def __init__(self, **loaders: Callable[[], nn.Module]):
        self.loaders = loaders

    def load(self, name: str) -> nn.Module:
        if name not in self.loaders:
            raise KeyError(f"frozen network {name!r} not provided (a loss asks only for those in its `frozen`)")
        return self.loaders[name]()

    @classmethod
    def for_run(cls, cfg_loss: Any, paths: Callable[[str], str | None], device: torch.device) -> "LossResources":
        """Loaders of the frozen networks the loss of `cfg_loss` declares; `paths(kind)` is where
        the run's artifact of that kind lies (`Artifacts.path`)."""
        def loader(network: FrozenNetwork) -> Callable[[], nn.Module]:
            path = paths(network.artifact) if network.artifact else None
            return lambda: network.loader()(cfg_loss, path, device)
        return cls(**{name: loader(FROZEN[name]) for name in LOSSES[cfg_loss.name].frozen})


class PairLoss:
    """Per-sample loss between the prediction D(x_t, t) and the stop-gradient target."""

    name: ClassVar[str]
    frozen: ClassVar[tuple[str, ...]] = ()      # the frozen networks it needs (keys of FROZEN)
    needs_feature_map: ClassVar[bool] = False   # "feature_map" in frozen (set by register_loss)

    def __call__(self, pred: Tensor, target: Tensor, iteration: int) -> dict[str, Tensor]:
        """Return {'loss': [B] per-sample term to backprop, optional monitored terms}."""
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise ConfigError for invalid loss fields (runs before any work starts)."""

    @classmethod
    def from_config(cls, cfg: Any, resources: LossResources) -> "PairLoss":
        return cls()

    @classmethod
    def artifacts(cls) -> tuple[str, ...]:
        """The artifact kinds its frozen networks are built as (what a run must build first)."""
        return tuple(FROZEN[name].artifact for name in cls.frozen if FROZEN[name].artifact)


def gradient_wrt_prediction(terms_fn: Callable[[Tensor], dict[str, Tensor]], pred: Tensor) -> Tensor:
    """d sum(loss) / d pred, the gradient the step sends into the network's output."""
    pred.grad = None
    terms_fn(pred)["loss"].sum().backward()
    return pred.grad.detach().clone()


def _flat(x: Tensor) -> Tensor:
    return x.flatten(1)


def _check_non_negative(cfg: Any, key: str) -> None:
    value = cfg.get(key, 0.0)
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"loss.{key}", f"must be a number >= 0, got {value!r}")


@register_loss("pseudo_huber")
class PseudoHuber(PairLoss):
    """sqrt(|D|^2 + c^2) - c with c = huber_c * sqrt(C*H*W); huber_c = 0 gives |D|."""

    def __init__(self, huber_c: float = 0.0):
        self.huber_c = float(huber_c)

    def __call__(self, pred, target, iteration):
        delta = _flat(pred - target)
        c = self.huber_c * math.sqrt(delta.shape[1])
        return {"loss": (delta.square().sum(1) + c * c).sqrt() - c}

    @classmethod
    def validate(cls, cfg):
        _check_non_negative(cfg, "huber_c")

    @classmethod
    def from_config(cls, cfg, resources):
        return cls(huber_c=cfg.get("huber_c", 0.0))


@register_loss("l2")
class SquaredL2(PairLoss):
    def __call__(self, pred, target, iteration):
        return {"loss": _flat(pred - target).square().sum(1)}


@register_loss("l1")
class L1(PairLoss):
    def __call__(self, pred, target, iteration):
        return {"loss": _flat(pred - target).abs().sum(1)}


def normalized_gradient_terms(pred: Tensor, target: Tensor,
                              distance: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """The normalised-gradient form (ALGORITHM §4).

    g = d dist(a, target)/da with a = pred detached; g_hat = g / max(|g|, 1e-5) per sample;
    loss = 1/2 |a - stopgrad(a - g_hat)|^2, so d loss / d pred = g_hat exactly.
    Only the input gradient is taken: the distance network is frozen and its
    parameters never accumulate gradients.
    """
    a = pred.detach().requires_grad_(True)
    with torch.enable_grad():
        dist = distance(a, target)
        (g,) = torch.autograd.grad(dist.sum(), a)
    g = g.float()
    g_hat = g / _flat(g).norm(dim=1).clamp_min(1e-5).view(-1, *([1] * (g.dim() - 1)))
    moved = (pred.detach() - g_hat).to(pred.dtype)
    return {"loss": 0.5 * _flat(pred - moved).square().sum(1), "dist": dist.detach()}


def manifold_feature_distance(feature_map: nn.Module, a: Tensor, target: Tensor,
                              eps: float = 1e-5) -> Tensor:
    """dist_phi(a, b) = sum_layers sum_channels rho(|phi_lc(a) - phi_lc(b)|_2 over space).

    rho(u) = sqrt(u^2 + eps^2) - eps, computed as sqrt(sum sq + eps^2) - eps so it is smooth
    at u = 0. Target features are computed under no_grad (ALGORITHM §4).
    """
    feats_a = feature_map.features(a)
    with torch.no_grad():
        feats_t = feature_map.features(target)
    total = a.new_zeros(a.shape[0], dtype=torch.float32)
    for fa, ft in zip(feats_a, feats_t):
        sq = (fa.float() - ft.float()).square()
        sq = sq.flatten(2).sum(2) if sq.dim() > 2 else sq   # [B, channels]
        total = total + ((sq + eps * eps).sqrt() - eps).sum(1)
    return total


@register_loss("mfd")
class ManifoldFeatureDistance(PairLoss):
    """AYT's loss: MFD through the frozen feature map, in normalised-gradient form."""

    frozen = ("feature_map",)

    def __init__(self, feature_map: nn.Module, eps: float = 1e-5):
        self.feature_map = feature_map
        self.eps = float(eps)

    def __call__(self, pred, target, iteration):
        return normalized_gradient_terms(
            pred, target, lambda a, b: manifold_feature_distance(self.feature_map, a, b, self.eps))

    @classmethod
    def validate(cls, cfg):
        _check_non_negative(cfg, "eps")

    @classmethod
    def from_config(cls, cfg, resources):
        return cls(resources.load("feature_map"), eps=cfg.get("eps", 1e-5))


@register_loss("lpips")
class LPIPSLoss(PairLoss):
    """LPIPS (VGG) distance in normalised-gradient form; weights come from local files."""

    frozen = ("lpips",)

    def __init__(self, lpips: nn.Module):
        self.lpips = lpips

    def __call__(self, pred, target, iteration):
        # The target branch needs no graph: its input is detached and the network frozen.
        return normalized_gradient_terms(pred, target, lambda a, b: self.lpips(a, b.detach()))

    @classmethod
    def validate(cls, cfg):
        for key in ("vgg_weights", "lin_weights"):
            path = cfg.get(key)
            if not path or not Path(str(path)).is_file():
                raise ConfigError(f"loss.{key}", f"file not found: {path!r}; LPIPS needs local VGG16 "
                                  "and LPIPS v0.1 weights (nothing downloads at run time)")

    @classmethod
    def from_config(cls, cfg, resources):
        return cls(resources.load("lpips"))


PIXEL_LOSSES = ("pseudo_huber", "l2", "l1")


@register_loss("mixed")
class Mixed(PairLoss):
    """L = L_pixel + lam * min(1, (it+1)/n_ramp) * L_MFD (ALGORITHM §4)."""

    frozen = ("feature_map",)

    def __init__(self, pixel: PairLoss, mfd: ManifoldFeatureDistance, lam: float, n_ramp: int):
        self.pixel, self.mfd, self.lam, self.n_ramp = pixel, mfd, float(lam), int(n_ramp)

    def __call__(self, pred, target, iteration):
        ramp = min(1.0, (iteration + 1) / self.n_ramp)
        p = self.pixel(pred, target, iteration)["loss"]
        m = self.mfd(pred, target, iteration)
        return {"loss": p + self.lam * ramp * m["loss"], "pixel": p.detach(), "dist": m["dist"]}

    @classmethod
    def validate(cls, cfg):
        if cfg.get("pixel") not in PIXEL_LOSSES:
            raise ConfigError("loss.pixel", f"unknown pixel loss {cfg.get('pixel')!r}; allowed: "
                              + ", ".join(PIXEL_LOSSES))
        _check_non_negative(cfg, "huber_c")
        _check_non_negative(cfg, "lam")
        _check_non_negative(cfg, "eps")
        if not isinstance(cfg.get("n_ramp"), int) or cfg.get("n_ramp") < 1:
            raise ConfigError("loss.n_ramp", f"must be an integer >= 1, got {cfg.get('n_ramp')!r}")

    @classmethod
    def from_config(cls, cfg, resources):
        pixel = LOSSES[cfg.pixel].from_config(cfg, resources)
        return cls(pixel, ManifoldFeatureDistance.from_config(cfg, resources), cfg.lam, cfg.n_ramp)


def validate_loss(cfg_loss: Any) -> type[PairLoss]:
    """Check loss.name and the loss's own fields; return its class."""
    name = cfg_loss.get("name") if cfg_loss is not None else None
    if name not in LOSSES:
        raise ConfigError("loss.name", f"unknown loss {name!r}; allowed: " + ", ".join(sorted(LOSSES)))
    LOSSES[name].validate(cfg_loss)
    return LOSSES[name]


def build_loss(cfg_loss: Any, resources: LossResources) -> PairLoss:
    return validate_loss(cfg_loss).from_config(cfg_loss, resources)
