"""A small CNN classifier whose penultimate features replace Inception for FID (ALGORITHM §6).

Datasets without a standard FID extractor (digits, MNIST, Fashion-MNIST) use a classifier
trained on their own labels, the usual practice for MNIST-like data. The weights file
holds the constructor kwargs too, so torch-fidelity's extractor can rebuild it from a
path alone (`load_classifier`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from ayt.data import ImageData, load_dataset


class DigitClassifier(nn.Module):
    """Conv stages (two 3x3 convs, then 2x average-pool) down to ~4x4, flatten, MLP head.

    Flattening (not global pooling) keeps where strokes are, which digit classes depend on.

    `features(x)` is the `feature_dim`-dimensional embedding before the last linear layer,
    the layer FID uses. x: [B, in_channels, resolution, resolution] in [-1, 1].
    """

    def __init__(self, in_channels: int, resolution: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.kwargs = dict(
            in_channels=in_channels, resolution=resolution, num_classes=num_classes, width=width, feature_dim=feature_dim
        )
        num_down = max(1, int(math.log2(max(resolution // 4, 1))))  # 16 -> 2 stages, 28 -> 2, 32 -> 3
        layers: list[nn.Module] = []
        ch_in = in_channels
        for i in range(num_down):
            ch = width * min(2**i, 4)
            layers += [
                nn.Conv2d(ch_in, ch, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
            ch_in = ch
        self.trunk = nn.Sequential(*layers)
        final = resolution // 2**num_down
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(ch_in * final * final, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def in_channels(self) -> int:
        return self.kwargs["in_channels"]

    @property
    def resolution(self) -> int:
        return self.kwargs["resolution"]

    def features(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, feature_dim] penultimate embedding."""
        return self.embed(self.trunk(x))

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, num_classes] logits."""
        return self.head(self.features(x))


def save_classifier(model: DigitClassifier, path: str) -> None:
    """Write {state_dict, kwargs} atomically; readable with `torch.load(weights_only=True)`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state_dict": state, "kwargs": dict(model.kwargs)}, tmp)
    os.replace(tmp, path)


def load_classifier(path: str, map_location: str | torch.device = "cpu") -> DigitClassifier:
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = DigitClassifier(**blob["kwargs"])
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


def _shift(x: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Light augmentation: translate each image by up to `max_shift` pixels (edge-padded)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=gen)
    rows = (dy + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: ImageData, device: torch.device, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / max(len(data), 1)


def train_classifier(
    train: ImageData,
    test: ImageData,
    cfg_classifier: Any,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
) -> tuple[DigitClassifier, float]:
    """Train with Adam on `train`; return the model (eval mode, on `device`) and its `test` accuracy.

    `cfg_classifier` has iterations, batch_size, lr, width (the `fid.classifier` config block).
    Deterministic for a given seed: init, batches and shifts come from seeded generators.
    """
    device = torch.device(device)
    iterations, batch_size = int(cfg_classifier.iterations), int(cfg_classifier.batch_size)
    lr, width = float(cfg_classifier.lr), int(cfg_classifier.width)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = DigitClassifier(train.channels, train.resolution, train.num_classes, width=width)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(iterations, 1), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    for _ in tqdm(range(iterations), disable=not progress, desc="fid classifier", leave=False):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x = _shift(train.images[idx], gen).to(device)
        y = train.labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    acc = evaluate_accuracy(model, test, device)
    return model.eval().requires_grad_(False), acc


def build_classifier(cfg: DictConfig, out: Path, data: ImageData, device: torch.device, progress: bool = True) -> None:
    """The `fid_classifier` artifact (ayt.artifacts): trained on `data` (the training split),
    its accuracy measured on the test split."""
    test = load_dataset(cfg.dataset, train=False)
    model, accuracy = train_classifier(data, test, cfg.fid.classifier, seed=int(cfg.fid.classifier.seed),
                                       device=device, progress=progress)
    save_classifier(model, str(out / "classifier.pt"))
    (out / "metrics.json").write_text(json.dumps({"fid_classifier_test_accuracy": accuracy}, indent=2, sort_keys=True))
