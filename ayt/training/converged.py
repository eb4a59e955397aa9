"""The fine-tuning regime's starting point: a consistency model trained to its plateau.

The paper's claim is about fine-tuning a strong model (EDM → consistency model at a low
learning rate), not about training from a weak denoiser. `training.init=converged` starts a
run from a shared, cached consistency model: the pretrained denoiser consistency-trained
with the `converged.loss` (pseudo-Huber by default: ECT's own loss, so the starting point
favours neither loss under study) for `converged.iterations` steps, on the run's own
dataset, network, EDM constants and schedule. Built once per setting, on the driver, by
the same single-process loop every run uses; its FID curve is stored next to the weights,
so a report can show how close to its plateau it was.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ayt.artifacts import ArtifactCache
from ayt.errors import ConfigError

log = logging.getLogger(__name__)

CONVERGED_KEYS = ("loss", "iterations", "batch_size", "lr", "seed", "eval_every", "ema_decay")


def validate_converged(cfg: DictConfig) -> None:
    """`converged.*` is read only with training.init=converged; then every key must be sound."""
    if cfg.training.init != "converged":
        return
    block = cfg.get("converged")
    if block is None:
        raise ConfigError("converged", "required with training.init=converged (see conf/config.yaml)")
    for key in CONVERGED_KEYS:
        if key not in block:
            raise ConfigError(f"converged.{key}", "missing (see conf/config.yaml)")
    for key in ("iterations", "batch_size", "eval_every"):
        value = block[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"converged.{key}", f"must be an integer >= 1, got {value!r}")
    if block.eval_every > block.iterations:
        raise ConfigError("converged.eval_every", f"must be <= converged.iterations ({block.iterations}), "
                          f"got {block.eval_every}")
    if not isinstance(block.lr, (int, float)) or isinstance(block.lr, bool) or not block.lr > 0:
        raise ConfigError("converged.lr", f"must be a number > 0, got {block.lr!r}")
    if not isinstance(block.ema_decay, (int, float)) or not 0 <= block.ema_decay < 1:
        raise ConfigError("converged.ema_decay", f"must be a number in [0, 1), got {block.ema_decay!r}")
    from ayt.method.losses import LOSSES
    if str(block.loss) not in LOSSES or LOSSES[str(block.loss)].needs_feature_map:
        allowed = sorted(k for k, v in LOSSES.items() if not v.needs_feature_map)
        raise ConfigError("converged.loss", f"unknown or feature-map loss {block.loss!r}; allowed: "
                          + ", ".join(allowed))


def converged_config(cfg: DictConfig, out_dir: str | Path) -> DictConfig:
    """The run that builds the converged model: `cfg` with the `converged.*` settings, started
    from the pretrained denoiser, its run files under `out_dir`."""
    from ayt.config import compose_config
    block = cfg.converged
    loss = compose_config([f"loss={block.loss}"]).loss
    run = OmegaConf.to_container(cfg, resolve=True)
    run.update(loss=OmegaConf.to_container(loss, resolve=True), batch_size=int(block.batch_size),
               lr=float(block.lr), lr_scaling="none", optimizer="adam", seed=int(block.seed),
               out_dir=str(out_dir), name="converged", progress=False)
    run["training"].update(init="pretrained", init_file=None, iterations=int(block.iterations),
                           eval_every=int(block.eval_every), checkpoint_every=int(block.iterations),
                           log_every=int(block.eval_every), ema_decay=float(block.ema_decay),
                           ema_halflife_kimg=None, fail_at_iteration=None)
    run["scaling"].update(backend="local", num_workers=1)
    return OmegaConf.create(run)


def converged_spec(cfg: DictConfig) -> dict[str, Any]:
    """What defines the converged model: the pretrained denoiser's spec, and how it was trained."""
    from ayt.training.prepare import pretrained_spec
    return {"pretrained": pretrained_spec(cfg), "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
            "converged": OmegaConf.to_container(cfg.converged, resolve=True),
            "optimizer": {"adam_betas": list(cfg.adam_betas)}, "precision": str(cfg.precision)}


def ensure_converged(cfg: DictConfig, cache: ArtifactCache, device: torch.device, progress: bool = True) -> Path:
    """The converged model's EMA weights (a denoiser state dict), built once per setting."""
    def build(tmp: Path) -> None:
        from ayt.training.loop import WorkerContext, train_consistency
        from ayt.training.prepare import ensure_artifacts
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            run = converged_config(cfg, scratch)
            artifacts = ensure_artifacts(run, progress=progress)
            log.info("building the converged model: %s, %d iterations at batch %d", run.loss.name,
                     run.training.iterations, run.batch_size)
            summary = train_consistency(run, artifacts, WorkerContext(device), progress=progress)
            ema = torch.load(Path(scratch) / "runs" / "converged" / "ema.pt", map_location="cpu", weights_only=True)
        torch.save(ema, tmp / "denoiser.pt")
        curves = summary["curves"]
        metrics = {f"converged_{key.split('/')[-1]}": float(curve[-1][1]) for key, curve in curves.items() if curve}
        metrics["converged_images"] = float(run.training.iterations * run.batch_size)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / "curves.json").write_text(json.dumps(curves))
    return cache.get_or_build("converged", converged_spec(cfg), build) / "denoiser.pt"
