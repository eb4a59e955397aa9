"""Training the manifold feature map φ on augmentation-label regression (ALGORITHM §5).

    x_aug, labels = augment(x, p)          p ramps linearly from 0 to augment.p
    loss = mean((head(φ(x_aug)) − labels)²)

RAdam; a held-out split measures how well the labels are predicted: the MSE against the
constant-zero predictor's (most labels are 0 at small p, so the raw MSE alone says little),
and R² = 1 − MSE / variance of the held-out labels, per label family (geo, clr, deg), so
maps of different sizes and budgets compare on one scale. The same split gives the map's
alignment cosines (`ayt.training.alignment`): how well MFD's step points at pixel errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm

from ayt.data import ImageData
from ayt.errors import ConfigError
from ayt.method.augment import FAMILIES, AugmentPipeline, validate_augment
from ayt.method.losses import ManifoldFeatureDistance
from ayt.networks.feature_map import FeatureMap, fm_kwargs, validate_feature_map
from ayt.training.alignment import alignment_cosines

_EVAL_PASSES = 8  # augmented passes over the held-out set for `label_mse` (more draws, less noise)
_BN_CALIBRATION_BATCHES = 20  # idt preset: batches that set BatchNorm statistics of the untrained net
_ALIGNMENT_IMAGES = 256  # held-out images on which the alignment cosines are measured


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation per epoch, batches may straddle epochs."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def ramped_p(iteration: int, p: float, ramp_iterations: int) -> float:
    """p rises linearly from 0 at iteration 0 to `p` at `ramp_iterations` (ALGORITHM §5)."""
    if ramp_iterations <= 0:
        return float(p)
    return float(p) * min(1.0, iteration / ramp_iterations)


@torch.no_grad()
def _evaluate(
    model: FeatureMap,
    augment: AugmentPipeline,
    images: Tensor,
    p: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, float]:
    """Held-out label quality over `_EVAL_PASSES` augmented passes of `images`: ``label_mse``,
    ``zero_mse`` (the constant-zero predictor), ``r2`` over all labels and ``r2_<family>``
    per label family, R² = 1 − Σ squared error / Σ squared deviation from each label's mean."""
    num = augment.num_labels
    sq_err, sums, sq_sums = (torch.zeros(num, dtype=torch.float64) for _ in range(3))  # on the host: MPS has no float64
    rows = 0
    for _ in range(_EVAL_PASSES):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            x_aug, labels = augment(x, p, generator)
            sq_err += (model(x_aug) - labels).square().sum(0).cpu().double()
            sums += labels.sum(0).cpu().double()
            sq_sums += labels.square().sum(0).cpu().double()
            rows += labels.shape[0]
    deviation = sq_sums - sums.square() / rows          # Σ (y − mean)² per label
    out = {"label_mse": float(sq_err.sum()) / (rows * num), "zero_mse": float(sq_sums.sum()) / (rows * num)}
    groups = {"r2": list(range(num))}
    for family in FAMILIES:
        columns = [i for i, f in enumerate(augment.label_families) if f == family]
        if columns:
            groups[f"r2_{family}"] = columns
    for key, columns in groups.items():
        out[key] = 1.0 - float(sq_err[columns].sum()) / max(float(deviation[columns].sum()), 1e-12)
    return out


def train_feature_map(
    images: Tensor,
    cfg_feature_map: Mapping[str, Any],
    cfg_augment: Mapping[str, Any],
    seed: int,
    device: torch.device | str,
    progress: bool = True,
) -> tuple[FeatureMap, dict[str, float | int]]:
    """Train φ on `images` ``[N, C, H, W]`` in [-1, 1]; returns the frozen net and its metrics.

    Metrics: ``label_mse`` (held-out, at the full augment.p), ``zero_mse`` (the constant-zero
    predictor on the same held-out labels), ``r2`` and ``r2_<family>`` (held-out R², see
    `_evaluate`), ``num_labels``, ``iterations``, ``train_images`` (iterations × batch_size),
    ``parameters`` and ``align_<error>`` (the MFD step's mean cosine with each error type of
    `ayt.training.alignment`, on up to 256 held-out images). The run is a
    function of `seed`: it fixes the initial weights, the split, the data order and every
    augmentation draw. With no labels (the `idt` preset) nothing is optimised: the randomly
    initialised net only gets its BatchNorm statistics from the data.
    """
    validate_feature_map(cfg_feature_map)
    validate_augment(cfg_augment)
    cfg = cfg_feature_map
    device = torch.device(device)
    n, channels, height, width = images.shape
    if height != width:
        raise ConfigError("dataset.resolution", f"the feature map needs square images, got {height}x{width}")

    # Split, data order: CPU generator. Augmentations: a generator on the training device.
    data_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    eval_gen = torch.Generator(device=device).manual_seed(seed + 2)
    order = torch.randperm(n, generator=data_gen)
    n_hold = int(round(float(cfg["holdout"]) * n))
    if n_hold < 1 or n - n_hold < 2:
        raise ConfigError(
            "feature_map.holdout", f"leaves {n - n_hold} training and {n_hold} held-out images out of {n}"
        )
    held_out, train = images[order[:n_hold]], images[order[n_hold:]]

    augment = AugmentPipeline(cfg_augment, channels)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = FeatureMap(channels, height, list(cfg["channels"]), augment.num_labels, cfg["convs_per_stage"])
    model.to(device).train()

    batch_size = int(cfg["batch_size"])
    batches = _batches(train.shape[0], batch_size, data_gen)
    p_full = float(cfg_augment["p"])
    iterations = int(cfg["iterations"]) if augment.num_labels > 0 else 0

    if augment.num_labels == 0:
        # Cumulative BatchNorm averages over a few plain batches, so eval mode is meaningful.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        with torch.no_grad():
            for _ in range(_BN_CALIBRATION_BATCHES):
                model(train[next(batches)].to(device))
    else:
        optimizer = torch.optim.RAdam(model.parameters(), lr=float(cfg["lr"]))
        bar = tqdm(range(iterations), desc="feature map", disable=not progress, leave=False)
        for iteration in bar:
            x = train[next(batches)].to(device, non_blocking=True)
            x_aug, labels = augment(x, ramped_p(iteration, p_full, cfg["p_ramp_iterations"]), aug_gen)
            loss = (model(x_aug) - labels).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if iteration % 50 == 0 or iteration == iterations - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()

    model.freeze()
    if augment.num_labels > 0:
        quality = _evaluate(model, augment, held_out, p_full, batch_size, eval_gen, device)
    else:
        quality = {"label_mse": 0.0, "zero_mse": 0.0}
    alignment = alignment_cosines(ManifoldFeatureDistance(model), held_out[:_ALIGNMENT_IMAGES].to(device),
                                  batch_size=min(batch_size, _ALIGNMENT_IMAGES), seed=seed) if n_hold >= 2 else {}
    metrics = {
        **quality,
        "num_labels": augment.num_labels,
        "iterations": iterations,
        "train_images": iterations * batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{f"align_{name}": cos for name, cos in alignment.items()},
    }
    return model, metrics


def build_feature_map(cfg: DictConfig, out: Path, data: ImageData, device: torch.device, progress: bool = True) -> None:
    """The `feature_map` artifact (ayt.artifacts): φ's kwargs and weights, and its metrics."""
    fm, metrics = train_feature_map(data.images.to(device), cfg.feature_map, cfg.augment,
                                    seed=int(cfg.feature_map.seed), device=device, progress=progress)
    torch.save({"kwargs": fm_kwargs(fm), "state_dict": {k: v.cpu() for k, v in fm.state_dict().items()}},
               out / "feature_map.pt")
    metrics = {f"feature_map_{k}": float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
