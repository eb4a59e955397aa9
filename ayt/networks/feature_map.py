"""The manifold feature map φ: a VGG-style regressor of augmentation parameters (ALGORITHM §5).

MFD (ALGORITHM §4) compares two images through `features`: the output of every
downsampling stage plus the regression head's output.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ayt.errors import ConfigError


def num_stages_for(resolution: int) -> int:
    """Downsampling stages = log2(resolution): the last stage leaves a 1×1 map (16 → 4, 32 → 5)."""
    if resolution < 2 or resolution & (resolution - 1):
        raise ConfigError("dataset.resolution", f"the feature map needs a power of two >= 2, got {resolution}")
    return resolution.bit_length() - 1


def _int_at_least(cfg: Mapping[str, Any], key: str, low: int) -> int:
    value = cfg[key] if key in cfg else None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"feature_map.{key}", f"must be an integer >= {low}, got {value!r}")
    return value


def validate_feature_map(cfg_feature_map: Mapping[str, Any]) -> None:
    """Check the `feature_map` config block; raise `ConfigError` naming the first bad field."""
    cfg = cfg_feature_map
    channels = cfg["channels"] if "channels" in cfg else None
    if channels is None or isinstance(channels, str) or not hasattr(channels, "__iter__"):
        raise ConfigError("feature_map.channels", f"must be a list of channel counts, got {channels!r}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
        raise ConfigError("feature_map.channels", f"entries must be integers >= 1, got {list(channels)}")
    _int_at_least(cfg, "convs_per_stage", 1)
    _int_at_least(cfg, "iterations", 0)
    _int_at_least(cfg, "batch_size", 2)  # BatchNorm on a 1×1 map needs two images
    _int_at_least(cfg, "p_ramp_iterations", 0)
    lr = cfg["lr"] if "lr" in cfg else None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError("feature_map.lr", f"must be a number > 0, got {lr!r}")
    holdout = cfg["holdout"] if "holdout" in cfg else None
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ConfigError("feature_map.holdout", f"must be in (0, 1), got {holdout!r}")


class FeatureMap(nn.Module):
    """VGG stages (conv3×3–BatchNorm–ReLU × `convs_per_stage`, then 2×2 max-pool) and a linear head.

    ``forward(x [B, C, H, W]) -> [B, num_labels]`` predicts the augmentation labels;
    ``features(x)`` returns the layers MFD compares. Stage s uses ``channels[s]`` channels;
    only the first log2(resolution) entries of `channels` are used.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        channels: Sequence[int],
        num_labels: int,
        convs_per_stage: int = 2,
    ):
        super().__init__()
        stages = num_stages_for(int(resolution))
        channels = [int(c) for c in channels]
        if len(channels) < stages:
            raise ConfigError(
                "feature_map.channels",
                f"needs at least {stages} entries for resolution {resolution} (one per downsampling stage), "
                f"got {len(channels)}",
            )
        if any(c < 1 for c in channels[:stages]):
            raise ConfigError("feature_map.channels", f"entries must be >= 1, got {channels}")
        if convs_per_stage < 1:
            raise ConfigError("feature_map.convs_per_stage", f"must be >= 1, got {convs_per_stage}")
        if num_labels < 0:
            raise ValueError(f"num_labels must be >= 0, got {num_labels}")

        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        self.num_labels = int(num_labels)
        self.channels = channels[:stages]  # with the three above: the constructor arguments, to rebuild it
        self.convs_per_stage = int(convs_per_stage)
        self.stages = nn.ModuleList()
        width = self.in_channels
        for out in channels[:stages]:
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                width = out
            layers.append(nn.MaxPool2d(2))
            self.stages.append(nn.Sequential(*layers))
        # After log2(resolution) halvings the map is 1×1; the pool only makes the flatten explicit.
        with warnings.catch_warnings():  # num_labels == 0 (the idt preset): an empty Linear is intended
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            linear = nn.Linear(width, self.num_labels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: Tensor) -> Tensor:
        """Predicted labels ``[B, num_labels]``."""
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def features(self, x: Tensor) -> list[Tensor]:
        """The layers MFD compares (ALGORITHM §4): each stage output ``[B, C_s, H_s, W_s]``, then
        the head output as ``[B, num_labels, 1, 1]`` so every layer has spatial axes to take the
        norm over (``num_stages + 1`` tensors; the last has 0 channels when num_labels == 0)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats.append(self.head(x)[:, :, None, None])
        return feats

    def freeze(self) -> FeatureMap:
        """Eval mode (BatchNorm uses running statistics) and no parameter gradients; returns self."""
        self.eval()
        self.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, resolution={self.resolution}, num_labels={self.num_labels}"


def fm_kwargs(fm: FeatureMap) -> dict:
    """The constructor arguments that rebuild `fm` (stored with its weights)."""
    return {"in_channels": fm.in_channels, "resolution": fm.resolution,
            "channels": [stage[0].out_channels for stage in fm.stages], "num_labels": fm.num_labels,
            "convs_per_stage": sum(isinstance(m, torch.nn.Conv2d) for m in fm.stages[0])}


def load_feature_map(path: str | os.PathLike, device: torch.device) -> FeatureMap:
    """The frozen feature map saved at `path`: eval mode, no parameter gradients."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    fm = FeatureMap(**blob["kwargs"])
    fm.load_state_dict(blob["state_dict"])
    return fm.to(device).freeze()


def load_frozen(cfg_loss: Any, path: str | None, device: torch.device) -> FeatureMap:
    """The feature map a loss uses (`ayt.method.losses.FROZEN`): the run's cached artifact."""
    return load_feature_map(path, device)
