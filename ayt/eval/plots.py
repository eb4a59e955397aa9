"""Pictures a researcher would rather look at than read: sample grids and FID curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def save_sample_grid(samples: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image
    samples = samples.detach().float().cpu()
    if samples.shape[-1] < 64:      # small images: enlarge (nearest) so the grid is readable
        scale = -(-64 // samples.shape[-1])
        samples = samples.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    nrow = nrow or int(math.ceil(math.sqrt(samples.shape[0])))
    save_image((samples + 1) / 2, str(path), nrow=nrow, padding=1)
    return Path(path)


def save_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                xlabel: str = "training iteration", ylabel: str = "FID", title: str = "",
                log_y: bool = True) -> Path:
    """One line per named curve of (x, y) points."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


__all__ = ["save_sample_grid", "save_curves"]
