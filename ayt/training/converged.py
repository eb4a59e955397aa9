"""The fine-tuning regime's starting point: a consistency model trained to its plateau.

The paper's claim is about fine-tuning a strong model (EDM → consistency model at a low
learning rate), not about training from a weak denoiser. `training.init=converged` starts a
run from a shared, cached consistency model: the pretrained denoiser consistency-trained
with the `converged.loss` (pseudo-Huber by default: ECT's own loss, so the starting point
favours neither loss under study) for `converged.iterations` steps, on the run's own
dataset, network, EDM constants and schedule. Built once per setting, on the driver, by
the same single-process loop every run uses; its FID curve is stored next to the weights,
so a report can show how close to its plateau it was. The artifact kind is declared in
`ayt.artifacts` (built from the `pretrained` one), its config checks in `ayt.startup`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ayt.config import compose_config
from ayt.data import ImageData
from ayt.training.loop import WorkerContext, train_consistency
from ayt.training.prepare import ensure_artifacts

log = logging.getLogger(__name__)


def converged_config(cfg: DictConfig, out_dir: str | Path) -> DictConfig:
    """The run that builds the converged model: `cfg` with the `converged.*` settings, started
    from the pretrained denoiser, its run files under `out_dir`."""
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


def build_converged(cfg: DictConfig, out: Path, data: ImageData, device: torch.device, progress: bool = True) -> None:
    """The `converged` artifact: the converged model's EMA weights (a denoiser state dict), its
    final metrics and FID curves, from a run of `converged_config` (its own artifacts cached)."""
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        run = converged_config(cfg, scratch)
        artifacts = ensure_artifacts(run, progress=progress)
        log.info("building the converged model: %s, %d iterations at batch %d", run.loss.name,
                 run.training.iterations, run.batch_size)
        summary = train_consistency(run, artifacts, WorkerContext(device), progress=progress)
        ema = torch.load(Path(scratch) / "runs" / "converged" / "ema.pt", map_location="cpu", weights_only=True)
    torch.save(ema, out / "denoiser.pt")
    curves = summary["curves"]
    metrics = {f"converged_{key.split('/')[-1]}": float(curve[-1][1]) for key, curve in curves.items() if curve}
    metrics["converged_images"] = float(run.training.iterations * run.batch_size)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out / "curves.json").write_text(json.dumps(curves))
