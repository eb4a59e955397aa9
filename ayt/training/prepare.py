"""Shared artifacts every run (and every trial of a study) needs, each built once and
cached by the hash of the config that defines it and of the code that builds it: the kinds
of `ayt.artifacts.ARTIFACT_KINDS` (pretrained EDM denoiser or another start, feature map,
FID extractor) and the FID reference statistics. Which kinds a run needs its start mode
(`ayt.startup`) and its loss's frozen networks (`ayt.method.losses.FROZEN`) say. A feature
map's metrics.json holds its held-out R² per label family, its training budget in images
and its alignment cosines; `artifact_record` passes them to every run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ayt.artifacts import (ARTIFACT_KINDS, ArtifactCache, ArtifactKind, Artifacts, classifier_spec, config_hash,
                           feature_map_spec, init_file_spec, pretrained_spec)
from ayt.data import ImageData, load_dataset
from ayt.eval.probe import ensure_references
from ayt.method.losses import LOSSES
from ayt.networks.feature_map import load_feature_map
from ayt.precision import apply_precision
from ayt.startup import start_mode

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    return torch.device(device)


def configure_torch(cfg: DictConfig) -> torch.device:
    """Apply process-wide torch settings from the config (threads; the precision policy's TF32
    switches, fp32 matmul precision and cuDNN autotuner, `ayt.precision`); return the device
    to use. Every process that trains calls it first: the plain loop's, each Ray Train
    worker's, each Tune trial's."""
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    apply_precision(str(cfg.precision), bool(cfg.get("cudnn_benchmark", True)))
    return resolve_device(str(cfg.device))


def needed_kinds(cfg: DictConfig) -> list[ArtifactKind]:
    """The artifact kinds a run of `cfg` uses, in declaration order: its start mode's, those of
    its loss's frozen networks, and those its setting needs whatever they are (FID classifier)."""
    named = {start_mode(cfg).artifact, *LOSSES[cfg.loss.name].artifacts()}
    return [kind for kind in ARTIFACT_KINDS.values()
            if kind.name in named or (kind.needed is not None and kind.needed(cfg))]


def artifact_specs(cfg: DictConfig) -> dict[str, dict]:
    """{kind: spec} of every artifact a run of `cfg` uses: equal for two configs whose runs
    share all their artifacts (a study builds each distinct set once, before its trials)."""
    return {kind.name: kind.spec(cfg) for kind in needed_kinds(cfg)}


def needs_feature_map(cfg: DictConfig) -> bool:
    return "feature_map" in LOSSES[cfg.loss.name].artifacts()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_artifact(kind: str, cfg: DictConfig, cache: ArtifactCache, data: ImageData, device: torch.device,
                    progress: bool = True) -> Path:
    """The file of the artifact of `kind` that `cfg` defines, built first if no process has yet."""
    declared = ARTIFACT_KINDS[kind]
    build = declared.builder()
    directory = cache.get_or_build(kind, declared.spec(cfg), lambda tmp: build(cfg, tmp, data, device, progress))
    return directory / declared.file


def ensure_init_file(cfg: DictConfig, cache: ArtifactCache, data: ImageData) -> Path:
    """training.init=file: the checked, cached copy of the file (`ayt.training.init_file`)."""
    return ensure_artifact("init_file", cfg, cache, data, torch.device("cpu"), progress=False)


def ensure_feature_map(cfg: DictConfig, cache: ArtifactCache, data: ImageData, device: torch.device,
                       progress: bool = True) -> Path:
    return ensure_artifact("feature_map", cfg, cache, data, device, progress)


def artifact_record(cfg: DictConfig) -> dict[str, Any]:
    """What a study records per trial about its shared artifacts, without building any: the
    cache key of each one `cfg` uses and the metrics it wrote (held-out feature-map label
    error, FID classifier accuracy), so a report can show them next to the FIDs."""
    cache = ArtifactCache(cfg.cache_dir)
    record: dict[str, Any] = {}
    for kind in needed_kinds(cfg):
        spec = kind.spec(cfg)
        path = cache.path(kind.name, spec)
        record[f"{kind.name}_hash"] = path.name
        if (path / "metrics.json").exists():
            record.update({k: v for k, v in _read_json(path / "metrics.json").items() if k.startswith(kind.name)})
        if kind.record is not None:
            record.update(kind.record(spec))
    if cfg.dataset.fid_extractor == "inception":
        record["fid_extractor"] = str(cfg.fid.inception_weights or "torch-fidelity default")
    return record


def ensure_artifacts(cfg: DictConfig, progress: bool = True) -> Artifacts:
    """Build (or find) everything a run of `cfg` needs, and the reference sets of its metrics."""
    device = configure_torch(cfg)
    cache = ArtifactCache(cfg.cache_dir)
    data = load_dataset(cfg.dataset, train=True)
    art = Artifacts(fid_cache=str(Path(cfg.cache_dir) / "fid"))
    for kind in needed_kinds(cfg):
        setattr(art, kind.slot, str(ensure_artifact(kind.name, cfg, cache, data, device, progress)))
    if art.fid_weights is None and cfg.fid.inception_weights:     # Inception: the configured weights file
        art.fid_weights = str(Path(cfg.fid.inception_weights))
    ensure_references(cfg, art.fid_weights, art.fid_cache, data, device)     # every metric's reference set
    for path in (art.pretrained, art.feature_map, art.fid_weights):
        if path:
            art.metrics.update(_read_json(Path(path).parent / "metrics.json"))
    return art


__all__ = ["Artifacts", "artifact_record", "artifact_specs", "classifier_spec", "config_hash", "ensure_artifacts", "feature_map_spec",
           "init_file_spec", "load_feature_map", "needs_feature_map", "pretrained_spec", "resolve_device"]
