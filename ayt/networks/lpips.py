"""LPIPS distance (VGG16 backbone, v0.1 linear heads) from local weight files only.

Used by the LPIPS loss in its normalised-gradient form (ALGORITHM §4): the module is
frozen but differentiable with respect to its inputs. Nothing is ever downloaded; the
two files are

* ``vgg_weights``: a torchvision ``vgg16`` state dict (keys ``features.N.weight``/``bias``;
  ``classifier.*`` keys, if present, are ignored);
* ``lin_weights``: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (keys
  ``lin{0..4}.model.1.weight``, shapes [1, C, 1, 1] for C = 64, 128, 256, 512, 512).

Small images: inputs below ``min_resolution`` (32) are bilinearly upsampled to it, so the
deepest tapped layer (relu5_3, after four 2x poolings) still has 2x2 positions instead of
collapsing to 1x1 (16x16 inputs) or failing (8x8 inputs).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ayt.errors import ConfigError

# torchvision's VGG16 ("configuration D") feature layers: ints are 3x3 conv widths, "M" max-pool.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Indices into ``features`` after which the LPIPS taps sit: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_ENDS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    """VGG16 feature layers up to relu5_3, indexed exactly as torchvision's ``vgg16().features``."""
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            cin = int(item)
    return nn.Sequential(*layers[: TAP_ENDS[-1]])


def _load(path: str | os.PathLike, field: str, what: str) -> dict[str, Tensor]:
    if path is None or not Path(path).is_file():
        raise ConfigError(
            field,
            f"file not found: {path}; LPIPS needs local weights ({what}), nothing is downloaded",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor file: name the field, keep the cause
        raise ConfigError(field, f"cannot read {path} as a state dict ({what}): {err}") from err
    if not isinstance(state, dict):
        raise ConfigError(field, f"{path} does not hold a state dict ({what})")
    return state


class LPIPS(nn.Module):
    """d(x, y) = Σ_layers mean_space( lin_l( (φ̂_l(x) − φ̂_l(y))² ) ), φ̂ unit-normalised over channels.

    Inputs [B, C, H, W] in [-1, 1] with C = 1 (repeated to RGB) or 3; returns [B].
    Parameters are frozen and the module stays in eval mode.
    """

    def __init__(self, vgg_weights: str | os.PathLike, lin_weights: str | os.PathLike, min_resolution: int = 32):
        super().__init__()
        self.min_resolution = min_resolution
        vgg_state = _load(vgg_weights, "loss.vgg_weights", "a torchvision vgg16 state dict")
        lin_state = _load(lin_weights, "loss.lin_weights", "the lpips package's weights/v0.1/vgg.pth")

        self.features = _vgg16_features()
        feats = {k[len("features.") :]: v for k, v in vgg_state.items() if k.startswith("features.")}
        feats = {k: v for k, v in feats.items() if int(k.split(".")[0]) < TAP_ENDS[-1]}
        try:
            self.features.load_state_dict(feats, strict=True)
        except RuntimeError as err:
            raise ConfigError("loss.vgg_weights", f"{vgg_weights} is not a torchvision vgg16 state dict: {err}") from err

        # The lin heads are 1x1 convs without bias: one non-negative weight per channel.
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        for i, (lin, c) in enumerate(zip(self.lins, TAP_CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state or tuple(lin_state[key].shape) != (1, c, 1, 1):
                got = tuple(lin_state[key].shape) if key in lin_state else "missing"
                raise ConfigError("loss.lin_weights", f"{lin_weights}: {key} must have shape (1, {c}, 1, 1), got {got}")
            with torch.no_grad():
                lin.weight.copy_(lin_state[key])

        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: a parent's ``.train()`` must not change a frozen metric."""
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised relu{1_2,2_2,3_3,4_3,5_3} activations of the scaled input."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS takes 1- or 3-channel images, got {x.shape[1]} channels")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_resolution:
            factor = self.min_resolution / min(h, w)
            size = (max(self.min_resolution, round(h * factor)), max(self.min_resolution, round(w * factor)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x.to(self.shift.dtype) - self.shift) / self.scale
        taps, start = [], 0
        for end in TAP_ENDS:
            x = self.features[start:end](x)
            start = end
            # lpips.normalize_tensor: divide by the channel L2 norm (+1e-10).
            taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: [B, C, H, W] in [-1, 1] -> per-sample LPIPS distance [B]."""
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        for fx, fy, lin in zip(self._taps(x), self._taps(y), self.lins):
            dist = dist + lin((fx - fy).square()).mean(dim=(1, 2, 3)).float()
        return dist


def write_random_lpips_weights(directory: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """Write random LPIPS weight files in the real formats (tests, smoke runs); returns (vgg, lin).

    The VGG file is the feature state dict of torchvision's own VGG16 builder (the
    ``make_layers(cfgs["D"])`` that ``vgg16(weights=None).features`` is made of; building the
    whole ``vgg16`` would also initialise its 120M-parameter classifier, seconds of CPU for
    nothing), so the key format is checked against torchvision rather than against this
    module. Lin weights are non-negative, as in the trained lpips heads, so d(x, y) > 0
    for x != y.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        vgg = {f"features.{k}": v for k, v in _torchvision_vgg16_features().state_dict().items()}
        lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    finally:
        torch.set_rng_state(gen_state)  # do not disturb the caller's random stream
    vgg_path, lin_path = directory / "vgg16.pth", directory / "lpips_vgg_v0.1.pth"
    torch.save(vgg, vgg_path)
    torch.save(lin, lin_path)
    return str(vgg_path), str(lin_path)


def load_frozen(cfg_loss, path: str | None, device: torch.device) -> LPIPS:
    """The LPIPS a loss uses (`ayt.method.losses.FROZEN`): from the two files its config names."""
    return LPIPS(cfg_loss.vgg_weights, cfg_loss.lin_weights).to(device)


def _torchvision_vgg16_features() -> nn.Module:
    """torchvision's ``vgg16(weights=None).features``, without building the classifier."""
    import torchvision

    try:
        from torchvision.models.vgg import cfgs, make_layers

        return make_layers(cfgs["D"], batch_norm=False)
    except (ImportError, KeyError):  # builder internals moved: fall back to the public API
        return torchvision.models.vgg16(weights=None).features
