"""Random augmentations with regression labels, the training signal of the feature map (ALGORITHM §5).

The feature map φ learns to regress the parameters of a random augmentation; its
gradients then point along the directions that move an image off the data manifold.
Every augmentation is one small class registered under its family (geo, clr, deg);
a preset (`conf/augment/*.yaml`) names the families, and the pipeline builds the
registered classes of those families in a fixed order, so the label layout never
depends on the order in which a config lists its families.

Conventions (documented once here, relied on by the tests):

* Images are ``[B, C, H, W]`` in [-1, 1]. Each augmentation is applied to each image
  independently with probability ``p``; where it is not applied its random draw is set
  to 0, which is its identity and makes its labels exactly 0.
* Geometry works in pixel units about the image centre, x to the right and y *down*.
  The four geometric augmentations compose into ONE affine warp, forward map
  ``G = T · A · R · S`` (scale first, then rotation, anisotropic scale, translation),
  executed once with ``affine_grid`` + ``grid_sample`` (bilinear, ``align_corners=False``)
  and **reflection padding**: the content that enters at a border is mirrored image
  content, so the net cannot read the warp off blank borders but must look at the
  image itself.
* Rotation: positive θ turns the content counter-clockwise as displayed (θ = π/2 equals
  ``torch.rot90(x, 1, dims=(-2, -1))``); labels ``(cos θ − 1, sin θ)``.
* Translation: draws ``(wx, wy) ~ N(0,1)``; the shift is ``(wx, wy) · translate_std`` as a
  *fraction of the image size* (content moves right/down by ``wx·translate_std·W``,
  ``wy·translate_std·H`` pixels). The labels are the unit-free draws ``(wx, wy)``, as in
  the paper's reference code (1202kbs/AYT ``augmentations.py``): labelling the shift in
  image units would shrink these labels by translate_std, i.e. weigh translation
  1/translate_std² (64× at 0.125) less than the other labels in the regression loss.
* Anisotropic scale: ``2^(w·aniso_std)`` along the angle r, ``1/that`` across it; labels
  ``(w cos r, w sin r)``. As in the reference code, r ~ U(−π, π) with probability
  ``aniso_rotate_prob`` [0.5] and r = 0 otherwise, so half the draws stretch along the
  image axes (the frequent case in real data), labelled ``(w, 0)``.
* Rotation range: ``rot_max`` (1 = full circle) comes from the dataset's
  ``augment_rot_max`` through the augment presets, because a full circle is only label
  noise where orientation carries meaning (a rotated 6 is a 9).
* Colour acts on the channel vector as one affine map ``x ↦ M x + b`` about mid-grey
  (0 in [-1, 1]); hue rotates about the luma axis (1,1,1)/√3, saturation scales the
  part orthogonal to it. Hue and saturation need 3 channels: for any other channel
  count the colour family reduces to brightness and contrast.
* Degradations follow, in order blur → mixup → noise. Mixup mixes with the image
  ``(i + k) mod B`` of the same batch (k ~ U{1, …, B−1} once per batch, so never the
  image itself when B > 1). Blur pads by reflection (replicate if the image is smaller
  than the kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ayt.errors import ConfigError

FAMILIES: tuple[str, ...] = ("geo", "clr", "deg")  # execution and label order

Params = dict[str, Tensor]

# --------------------------------------------------------------------------------------
# Config checks (one per kind of strength), named in each augmentation's `strengths`.


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(field, f"must be finite, got {value}")
    return float(value)


def _nonnegative(field: str, value: Any) -> None:
    if _number(field, value) < 0:
        raise ConfigError(field, f"must be >= 0, got {value}")


def _positive(field: str, value: Any) -> None:
    if _number(field, value) <= 0:
        raise ConfigError(field, f"must be > 0, got {value}")


def _probability(field: str, value: Any) -> None:
    if not 0.0 <= _number(field, value) <= 1.0:
        raise ConfigError(field, f"must be in [0, 1], got {value}")


def _odd_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ConfigError(field, f"must be an odd integer >= 1, got {value!r}")


# --------------------------------------------------------------------------------------
# Random draws: made on the generator's device (a CPU generator cannot fill a CUDA
# tensor), then moved to the images' device.


class _Rng:
    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator = generator
        self.device = device
        self._draw_device = generator.device if generator is not None else device

    def uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self._draw_device).to(self.device)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self._draw_device).to(self.device)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        out = torch.randint(low, high, shape, generator=self.generator, device=self._draw_device)
        return out.to(self.device)


# --------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, list[type[Augmentation]]] = {family: [] for family in FAMILIES}


def register(family: str) -> Callable[[type[Augmentation]], type[Augmentation]]:
    """Class decorator: add an augmentation to `family` (label order = registration order)."""
    if family not in _REGISTRY:
        raise ValueError(f"unknown augmentation family {family!r}; allowed: {', '.join(sorted(FAMILIES))}")

    def add(cls: type[Augmentation]) -> type[Augmentation]:
        cls.family = family
        _REGISTRY[family].append(cls)
        return cls

    return add


class Augmentation:
    """One augmentation: samples its parameters and turns them into labels.

    Subclasses set `name`, `label_names` and `strengths` (the config keys they read, each
    with its check), and implement `draw` (parameters for every image, as if applied)
    and `labels`. The base class zeroes the draw where the augmentation is not applied.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    label_names: ClassVar[tuple[str, ...]]
    strengths: ClassVar[dict[str, Callable[[str, Any], None]]] = {}
    auxiliary: ClassVar[tuple[str, ...]] = ()  # parameters left as drawn (inert once the rest is 0)

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = {key: cfg[key] for key in self.strengths}

    @classmethod
    def supports(cls, channels: int) -> bool:
        """Whether this augmentation exists for images with `channels` channels."""
        return True

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def draw(self, shape: torch.Size, rng: _Rng) -> Params:
        raise NotImplementedError

    def labels(self, params: Params) -> Tensor:
        """Labels ``[B, num_labels]``; exactly 0 where the draw is 0 (not applied)."""
        raise NotImplementedError

    def sample(self, applied: Tensor, shape: torch.Size, rng: _Rng) -> Params:
        """Parameters for a batch; every float parameter is 0 (identity) where not applied."""
        params = self.draw(shape, rng)
        for key, value in params.items():
            if key not in self.auxiliary:
                params[key] = torch.where(applied.view(-1, *[1] * (value.dim() - 1)), value, 0.0)
        return params


class GeometricAugmentation(Augmentation):
    def matrix(self, params: Params, size: tuple[int, int], inverse: bool = False) -> Tensor:
        """Forward (or inverse) map ``[B, 3, 3]`` in centred pixel coordinates, y down; size = (H, W)."""
        raise NotImplementedError


class ColourAugmentation(Augmentation):
    def affine(self, params: Params, channels: int) -> tuple[Tensor, Tensor]:
        """The colour map ``x ↦ M x + b`` per image: ``M [B, C, C]``, ``b [B, C]``."""
        raise NotImplementedError


class DegradationAugmentation(Augmentation):
    def apply(self, x: Tensor, params: Params) -> Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Small matrix helpers (batched, built from per-image scalars).


def _affine2d(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """``[[a, b, tx], [c, d, ty], [0, 0, 1]]`` for each image: ``[B, 3, 3]``."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    rows = [torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def _rotation2d(theta: Tensor) -> Tensor:
    """Counter-clockwise on screen (y down): (x, y) ↦ (x cos θ + y sin θ, −x sin θ + y cos θ)."""
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    return _affine2d(cos, sin, -sin, cos, zero, zero)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _affine2d(sx, zero, zero, sy, zero, zero)


# --------------------------------------------------------------------------------------
# geo (7 labels).


@register("geo")
class IsotropicScale(GeometricAugmentation):
    """Scale 2^(w·scale_std), w ~ N(0,1); label w."""

    name = "scale"
    label_names = ("scale",)
    strengths = {"scale_std": _nonnegative}

    def draw(self, shape, rng):
        return {"w": rng.normal(shape[0])}

    def labels(self, params):
        return params["w"][:, None]

    def matrix(self, params, size, inverse=False):
        s = torch.exp2(params["w"] * (-self.cfg["scale_std"] if inverse else self.cfg["scale_std"]))
        return _scale2d(s, s)


@register("geo")
class Rotation(GeometricAugmentation):
    """Rotation θ ~ U(−π·rot_max, π·rot_max); labels (cos θ − 1, sin θ)."""

    name = "rotate"
    label_names = ("rotate_cos", "rotate_sin")
    strengths = {"rot_max": _nonnegative}

    def draw(self, shape, rng):
        return {"theta": (rng.uniform(shape[0]) * 2 - 1) * (math.pi * self.cfg["rot_max"])}

    def labels(self, params):
        theta = params["theta"]
        return torch.stack([theta.cos() - 1, theta.sin()], -1)

    def matrix(self, params, size, inverse=False):
        return _rotation2d(-params["theta"] if inverse else params["theta"])


@register("geo")
class AnisotropicScale(GeometricAugmentation):
    """Scale 2^(w·aniso_std) along angle r, the inverse across it; labels (w cos r, w sin r).

    r ~ U(−π, π) with probability aniso_rotate_prob, else 0 (axis-aligned), as the
    reference code draws it (§5). Note (w, r) and (−w, r + π/2) give the same warp but
    different labels, so not all of this label's variance is predictable; (w cos 2r,
    w sin 2r) would be unambiguous, but we keep the paper's labels.
    """

    name = "aniso"
    label_names = ("aniso_cos", "aniso_sin")
    strengths = {"aniso_std": _nonnegative, "aniso_rotate_prob": _probability}

    def draw(self, shape, rng):
        batch = shape[0]
        w, angle = rng.normal(batch), (rng.uniform(batch) * 2 - 1) * math.pi
        rotated = rng.uniform(batch) < self.cfg["aniso_rotate_prob"]
        return {"w": w, "r": torch.where(rotated, angle, 0.0)}

    def labels(self, params):
        w, r = params["w"], params["r"]
        return torch.stack([w * r.cos(), w * r.sin()], -1)

    def matrix(self, params, size, inverse=False):
        s = torch.exp2(params["w"] * (-self.cfg["aniso_std"] if inverse else self.cfg["aniso_std"]))
        r = params["r"]
        return _rotation2d(r) @ _scale2d(s, 1 / s) @ _rotation2d(-r)


@register("geo")
class Translation(GeometricAugmentation):
    """Shift (wx, wy)·translate_std, a fraction of the image size, (wx, wy) ~ N(0,1); labels
    the unit-free draws (wx, wy), as the reference code labels them."""

    name = "translate"
    label_names = ("translate_x", "translate_y")
    strengths = {"translate_std": _nonnegative}

    def draw(self, shape, rng):
        return {"w": rng.normal(shape[0], 2)}

    def labels(self, params):
        return params["w"]

    def matrix(self, params, size, inverse=False):
        t = params["w"] * (-self.cfg["translate_std"] if inverse else self.cfg["translate_std"])
        height, width = size
        one, zero = torch.ones_like(t[:, 0]), torch.zeros_like(t[:, 0])
        return _affine2d(one, zero, zero, one, t[:, 0] * width, t[:, 1] * height)


# --------------------------------------------------------------------------------------
# clr (5 labels on RGB, 2 otherwise).


def _luma_projector(batch: int, like: Tensor) -> Tensor:
    """v vᵀ with v = (1,1,1)/√3, the projector onto the grey axis: ``[B, 3, 3]``."""
    return torch.full((batch, 3, 3), 1.0 / 3.0, dtype=like.dtype, device=like.device)


def _eye(batch: int, channels: int, like: Tensor) -> Tensor:
    return torch.eye(channels, dtype=like.dtype, device=like.device).expand(batch, channels, channels)


@register("clr")
class Brightness(ColourAugmentation):
    """Add w·brightness_std to every channel; label w."""

    name = "brightness"
    label_names = ("brightness",)
    strengths = {"brightness_std": _nonnegative}

    def draw(self, shape, rng):
        return {"w": rng.normal(shape[0])}

    def labels(self, params):
        return params["w"][:, None]

    def affine(self, params, channels):
        w = params["w"]
        b = (w * self.cfg["brightness_std"])[:, None].expand(-1, channels)
        return _eye(w.shape[0], channels, w), b


@register("clr")
class Contrast(ColourAugmentation):
    """Multiply by 2^(w·contrast_std) about mid-grey; label w."""

    name = "contrast"
    label_names = ("contrast",)
    strengths = {"contrast_std": _nonnegative}

    def draw(self, shape, rng):
        return {"w": rng.normal(shape[0])}

    def labels(self, params):
        return params["w"][:, None]

    def affine(self, params, channels):
        w = params["w"]
        c = torch.exp2(w * self.cfg["contrast_std"])
        zero_shift = torch.zeros(w.shape[0], channels, dtype=w.dtype, device=w.device)
        return c[:, None, None] * _eye(w.shape[0], channels, w), zero_shift


@register("clr")
class Hue(ColourAugmentation):
    """Rotate θ ~ U(−π·hue_max, π·hue_max) about the luma axis; labels (cos θ − 1, sin θ)."""

    name = "hue"
    label_names = ("hue_cos", "hue_sin")
    strengths = {"hue_max": _nonnegative}

    @classmethod
    def supports(cls, channels):
        return channels == 3

    def draw(self, shape, rng):
        return {"theta": (rng.uniform(shape[0]) * 2 - 1) * (math.pi * self.cfg["hue_max"])}

    def labels(self, params):
        theta = params["theta"]
        return torch.stack([theta.cos() - 1, theta.sin()], -1)

    def affine(self, params, channels):
        # Rodrigues: R = cos θ I + sin θ [v]× + (1 − cos θ) v vᵀ, v = (1,1,1)/√3.
        theta = params["theta"]
        batch = theta.shape[0]
        k = 1.0 / math.sqrt(3.0)
        cross = torch.tensor([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]], dtype=theta.dtype, device=theta.device)
        cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
        m = cos * _eye(batch, 3, theta) + sin * cross + (1 - cos) * _luma_projector(batch, theta)
        return m, torch.zeros(batch, 3, dtype=theta.dtype, device=theta.device)


@register("clr")
class Saturation(ColourAugmentation):
    """Scale the chroma (the part orthogonal to the luma axis) by 2^(w·saturation_std); label w."""

    name = "saturation"
    label_names = ("saturation",)
    strengths = {"saturation_std": _nonnegative}

    @classmethod
    def supports(cls, channels):
        return channels == 3

    def draw(self, shape, rng):
        return {"w": rng.normal(shape[0])}

    def labels(self, params):
        return params["w"][:, None]

    def affine(self, params, channels):
        w = params["w"]
        batch = w.shape[0]
        s = torch.exp2(w * self.cfg["saturation_std"])[:, None, None]
        luma = _luma_projector(batch, w)
        m = luma + (_eye(batch, 3, w) - luma) * s
        return m, torch.zeros(batch, 3, dtype=w.dtype, device=w.device)


# --------------------------------------------------------------------------------------
# deg (3 labels).


@register("deg")
class GaussianBlur(DegradationAugmentation):
    """Gaussian blur σ ~ U(0, blur_max) with a blur_kernel-tap separable kernel; label σ."""

    name = "blur"
    label_names = ("blur",)
    strengths = {"blur_max": _nonnegative, "blur_kernel": _odd_positive_int}

    def draw(self, shape, rng):
        return {"sigma": rng.uniform(shape[0]) * self.cfg["blur_max"]}

    def labels(self, params):
        return params["sigma"][:, None]

    def apply(self, x, params):
        batch, channels, height, width = x.shape
        size = int(self.cfg["blur_kernel"])
        pad = size // 2
        taps = torch.arange(size, dtype=x.dtype, device=x.device) - pad
        # σ → 0 gives the delta kernel (exp(−∞) = 0 off-centre), i.e. the identity.
        sigma = params["sigma"].to(x.dtype).clamp_min(1e-6)[:, None]
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K]
        kernel = kernel.repeat_interleave(channels, dim=0)  # [B·C, K], one per (image, channel)
        mode = "reflect" if pad < min(height, width) else "replicate"
        y = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode=mode)
        y = F.conv2d(y, kernel[:, None, :, None], groups=batch * channels)  # vertical pass
        y = F.conv2d(y, kernel[:, None, None, :], groups=batch * channels)  # horizontal pass
        y = y.reshape(batch, channels, height, width)
        return torch.where((params["sigma"] > 0).view(-1, 1, 1, 1), y, x)


@register("deg")
class Mixup(DegradationAugmentation):
    """Mix with another image of the batch, weight 0.5·Beta(1, mixup_beta); label the weight."""

    name = "mixup"
    label_names = ("mixup",)
    strengths = {"mixup_beta": _positive}
    auxiliary = ("partner",)

    def draw(self, shape, rng):
        batch = shape[0]
        # Beta(1, β) by inversion: its CDF is 1 − (1 − u)^β, so 1 − U^(1/β) with U ~ U(0, 1).
        weight = 0.5 * (1 - rng.uniform(batch) ** (1.0 / self.cfg["mixup_beta"]))
        shift = rng.randint(1, batch, 1) if batch > 1 else torch.zeros(1, dtype=torch.long, device=rng.device)
        partner = (torch.arange(batch, device=rng.device) + shift) % batch
        return {"weight": weight, "partner": partner}

    def labels(self, params):
        return params["weight"][:, None]

    def apply(self, x, params):
        w = params["weight"].to(x.dtype).view(-1, 1, 1, 1)
        return torch.where(w > 0, x + w * (x[params["partner"]] - x), x)


@register("deg")
class Noise(DegradationAugmentation):
    """Add magnitude U(0, noise_std) times a random direction of norm sqrt(C·H·W); label the magnitude."""

    name = "noise"
    label_names = ("noise",)
    strengths = {"noise_std": _nonnegative}
    auxiliary = ("direction",)

    def draw(self, shape, rng):
        batch = shape[0]
        direction = rng.normal(*shape)
        norm = direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        direction = direction * (math.sqrt(direction[0].numel()) / norm)
        return {"magnitude": rng.uniform(batch) * self.cfg["noise_std"], "direction": direction}

    def labels(self, params):
        return params["magnitude"][:, None]

    def apply(self, x, params):
        m = params["magnitude"].to(x.dtype).view(-1, 1, 1, 1)
        return torch.where(m > 0, x + m * params["direction"].to(x.dtype), x)


# --------------------------------------------------------------------------------------
# Validation and the pipeline.


def _families(cfg: Mapping[str, Any]) -> list[str]:
    if "families" not in cfg:
        raise ConfigError("augment.families", "missing")
    families = cfg["families"]
    if isinstance(families, str) or not hasattr(families, "__iter__"):
        raise ConfigError("augment.families", f"must be a list of families, got {families!r}")
    families = list(families)
    for family in families:
        if family not in _REGISTRY:
            raise ConfigError(
                "augment.families", f"unknown family {family!r}; allowed: {', '.join(sorted(FAMILIES))}"
            )
    if len(set(families)) != len(families):
        raise ConfigError("augment.families", f"lists a family twice: {families}")
    return families


def validate_augment(cfg_augment: Mapping[str, Any]) -> None:
    """Check an `augment` config group; raise `ConfigError` naming the first bad field.

    Every strength key that is present is checked (a sweep may set one that the preset
    does not use); the keys of the enabled families must be present.
    """
    families = _families(cfg_augment)
    if "p" not in cfg_augment:
        raise ConfigError("augment.p", "missing")
    p = _number("augment.p", cfg_augment["p"])
    if not 0.0 <= p <= 1.0:
        raise ConfigError("augment.p", f"must be in [0, 1], got {cfg_augment['p']}")
    for family in FAMILIES:
        for cls in _REGISTRY[family]:
            for key, check in cls.strengths.items():
                if key in cfg_augment:
                    check(f"augment.{key}", cfg_augment[key])
                elif family in families:
                    raise ConfigError(f"augment.{key}", f"missing (the {family!r} family needs it)")


class AugmentPipeline:
    """The augmentations of one preset, applied with labels (ALGORITHM §5).

    ``pipeline(x, p, generator)`` returns ``(x_aug, labels)`` with labels
    ``[B, num_labels]`` in the order of `label_names`. ``sample_params`` and ``apply``
    split that call, so a caller (or a test) can apply chosen parameters.
    """

    def __init__(self, cfg_augment: Mapping[str, Any], channels: int):
        validate_augment(cfg_augment)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        enabled = set(_families(cfg_augment))
        self.channels = int(channels)
        self.augmentations: list[Augmentation] = [
            cls(cfg_augment)
            for family in FAMILIES
            if family in enabled
            for cls in _REGISTRY[family]
            if cls.supports(self.channels)
        ]

    @property
    def num_labels(self) -> int:
        return sum(aug.num_labels for aug in self.augmentations)

    @property
    def label_names(self) -> list[str]:
        return [name for aug in self.augmentations for name in aug.label_names]

    @property
    def label_families(self) -> list[str]:
        """The family (geo, clr, deg) of each label, in the order of `label_names`."""
        return [aug.family for aug in self.augmentations for _ in aug.label_names]

    def sample_params(
        self,
        shape: torch.Size | tuple[int, int, int, int],
        p: float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Params]:
        """Draw every augmentation's parameters for a batch of `shape`: ``{aug name: params}``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        shape = torch.Size(shape)
        rng = _Rng(generator, torch.device(device) if device is not None else torch.device("cpu"))
        params = {}
        for aug in self.augmentations:
            applied = rng.uniform(shape[0]) < p  # each augmentation independently per image
            params[aug.name] = aug.sample(applied, shape, rng)
        return params

    def apply(self, x: Tensor, params: Mapping[str, Params]) -> tuple[Tensor, Tensor]:
        """Apply given parameters: geometry (one warp), then colour (one affine map), then degradations."""
        batch, channels, height, width = x.shape
        if channels != self.channels:
            raise ValueError(f"pipeline built for {self.channels} channels, got images with {channels}")
        params = {name: {k: v.to(x.device) for k, v in p.items()} for name, p in params.items()}
        labels = [aug.labels(params[aug.name]).to(x.dtype) for aug in self.augmentations]
        x = self._warp(x, params, labels)
        x = self._colour(x, params, labels)
        for aug in self.augmentations:
            if isinstance(aug, DegradationAugmentation):
                x = aug.apply(x, params[aug.name])
        labels_t = torch.cat(labels, dim=1) if labels else x.new_zeros(batch, 0)
        return x, labels_t

    def __call__(
        self, x: Tensor, p: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment a batch ``[B, C, H, W]`` in [-1, 1]; returns ``(x_aug, labels [B, num_labels])``."""
        return self.apply(x, self.sample_params(x.shape, p, generator, x.device))

    # -- the three stages ---------------------------------------------------------------

    def _touched(self, kind: type, labels: list[Tensor], batch: int, device: torch.device) -> Tensor:
        """Images on which at least one augmentation of `kind` was applied (a non-zero label)."""
        touched = torch.zeros(batch, dtype=torch.bool, device=device)
        for aug, lab in zip(self.augmentations, labels):
            if isinstance(aug, kind):
                touched |= (lab != 0).any(dim=1)
        return touched

    def _warp(self, x: Tensor, params: Mapping[str, Params], labels: list[Tensor]) -> Tensor:
        geometric = [aug for aug in self.augmentations if isinstance(aug, GeometricAugmentation)]
        if not geometric:
            return x
        batch, _, height, width = x.shape
        # G = T·A·R·S, so G⁻¹ = S⁻¹·R⁻¹·A⁻¹·T⁻¹: the inverses multiply in registration order.
        g_inv = torch.eye(3, dtype=x.dtype, device=x.device).expand(batch, 3, 3)
        for aug in geometric:
            g_inv = g_inv @ aug.matrix(params[aug.name], (height, width), inverse=True).to(x.dtype)
        # affine_grid wants output→input in normalised coordinates: N⁻¹ G⁻¹ N, N = diag(W/2, H/2, 1).
        n = torch.diag(torch.tensor([width / 2, height / 2, 1.0], dtype=x.dtype, device=x.device))
        n_inv = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], dtype=x.dtype, device=x.device))
        theta = (n_inv @ g_inv @ n)[:, :2, :]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # Untouched images keep their exact pixels (the identity grid is exact only up to rounding).
        touched = self._touched(GeometricAugmentation, labels, batch, x.device)
        return torch.where(touched.view(-1, 1, 1, 1), warped, x)

    def _colour(self, x: Tensor, params: Mapping[str, Params], labels: list[Tensor]) -> Tensor:
        colour = [aug for aug in self.augmentations if isinstance(aug, ColourAugmentation)]
        if not colour:
            return x
        batch, channels = x.shape[:2]
        m = _eye(batch, channels, x)
        b = x.new_zeros(batch, channels)
        for aug in colour:  # compose: each new map acts on the previous result
            a_m, a_b = aug.affine(params[aug.name], channels)
            a_m, a_b = a_m.to(x.dtype), a_b.to(x.dtype)
            m, b = a_m @ m, (a_m @ b[:, :, None])[:, :, 0] + a_b
        y = torch.einsum("bij,bjhw->bihw", m, x) + b[:, :, None, None]
        touched = self._touched(ColourAugmentation, labels, batch, x.device)
        return torch.where(touched.view(-1, 1, 1, 1), y, x)
