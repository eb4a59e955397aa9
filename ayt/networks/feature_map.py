"""The manifold feature map φ: a VGG-style regressor of augmentation parameters (ALGORITHM §5).

MFD (ALGORITHM §4) compares two images through `features`: the output of every
downsampling stage plus the regression head's output.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor, nn

from ayt.errors import ConfigError


def num_stages_for(resolution: int) -> int:
    """Downsampling stages = log2(resolution): the last stage leaves a 1×1 map (16 → 4, 32 → 5)."""
    if resolution < 2 or resolution & (resolution - 1):
        raise ConfigError("dataset.resolution", f"the feature map needs a power of two >= 2, got {resolution}")
    return resolution.bit_length() - 1


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
