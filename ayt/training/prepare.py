"""Shared artifacts every run (and every trial of a study) needs, each built once and
cached by the hash of the config that defines it (the `*_spec` functions) and of the code
that builds it (`ayt.artifacts.ARTIFACT_SOURCES`): the pretrained EDM denoiser, the
feature map for an augmentation setting, the FID extractor and its reference statistics.
A feature map's metrics.json holds its held-out R² per label family, its training budget
in images and its alignment cosines; `artifact_record` passes them to every run."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ayt.artifacts import ArtifactCache, config_hash
from ayt.data import ImageData, load_dataset
from ayt.errors import ConfigError
from ayt.method.losses import LOSSES

log = logging.getLogger(__name__)


@dataclass
class Artifacts:
    """Absolute paths of the shared artifacts one run uses, plus how good they are."""

    pretrained: str | None = None      # EDM denoiser EMA weights (torch.save dict): ours, or the cached init_file
    feature_map: str | None = None     # feature map {kwargs, state_dict, metrics}
    fid_weights: str | None = None     # FID extractor weights (classifier or Inception)
    fid_cache: str = ""                # torch-fidelity cache root (reference statistics)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    return torch.device(device)


def configure_torch(cfg: DictConfig) -> torch.device:
    """Apply process-wide torch settings from the config; return the device to use."""
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    return resolve_device(str(cfg.device))


DATASET_AUGMENT_KEYS = ("augment_rot_max",)   # dataset keys read only through `augment` (its spec has them)


def _data_spec(cfg: DictConfig) -> dict:
    spec = OmegaConf.to_container(cfg.dataset, resolve=True)
    return {k: v for k, v in spec.items() if k not in DATASET_AUGMENT_KEYS}


def pretrained_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "network": OmegaConf.to_container(cfg.network, resolve=True),
            "edm": OmegaConf.to_container(cfg.edm, resolve=True),
            "pretrain": OmegaConf.to_container(cfg.pretrain, resolve=True)}


def init_file_spec(cfg: DictConfig) -> dict:
    """training.init=file: keyed by the file's content (sha256), not its path, and by the network
    it must fit (a run whose network changes checks the file again)."""
    from ayt.config import file_sha256
    return {"init_file_sha256": file_sha256(cfg.training.init_file), "resolution": int(cfg.dataset.resolution),
            "network": OmegaConf.to_container(cfg.network, resolve=True),
            "edm": OmegaConf.to_container(cfg.edm, resolve=True)}


def feature_map_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "augment": OmegaConf.to_container(cfg.augment, resolve=True),
            "feature_map": OmegaConf.to_container(cfg.feature_map, resolve=True)}


def classifier_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "classifier": OmegaConf.to_container(cfg.fid.classifier, resolve=True)}


def needs_feature_map(cfg: DictConfig) -> bool:
    return LOSSES[cfg.loss.name].needs_feature_map


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_pretrained(cfg: DictConfig, cache: ArtifactCache, data: ImageData, device: torch.device,
                      progress: bool = True) -> Path:
    def build(tmp: Path) -> None:
        from ayt.networks.precond import build_denoiser
        from ayt.training.pretrain import pretrain_diffusion
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.pretrain.seed))
            net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device)
        state, metrics = pretrain_diffusion(net, data.images.to(device), cfg.pretrain,
                                            float(cfg.edm.sigma_data), progress=progress)
        torch.save({k: v.cpu() for k, v in state.items()}, tmp / "denoiser.pt")
        _write_json(tmp / "metrics.json", metrics)
    return cache.get_or_build("pretrained", pretrained_spec(cfg), build) / "denoiser.pt"


def ensure_init_file(cfg: DictConfig, cache: ArtifactCache, data: ImageData) -> Path:
    """training.init=file: check the state dict fits `cfg.network` (one-line ConfigError naming
    training.init_file, the key and the shapes), then cache a copy keyed by its sha256."""
    def build(tmp: Path) -> None:
        from ayt.networks.precond import build_denoiser
        path = str(cfg.training.init_file)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError("training.init_file", f"cannot read {path} as a torch state dict "
                              f"({' '.join(str(err).split())[:160]})") from None
        if isinstance(state, dict) and isinstance(state.get("ema"), dict):
            state = state["ema"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError("training.init_file", f"{path} is not a state dict of tensors")
        with torch.device("meta"):
            expected = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).state_dict()
        hint = "(EDM pickles: python -m ayt.tools.import_edm; network.* must match the file)"
        for key, want in expected.items():
            if key not in state:
                raise ConfigError("training.init_file", f"{path} has no {key!r} (shape {list(want.shape)}) {hint}")
            if tuple(state[key].shape) != tuple(want.shape):
                raise ConfigError("training.init_file", f"{path}: {key!r} has shape {list(state[key].shape)}, "
                                  f"the network expects {list(want.shape)} {hint}")
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ConfigError("training.init_file", f"{path}: unexpected key {extra[0]!r} {hint}")
        torch.save({k: state[k] for k in expected}, tmp / "denoiser.pt")
    return cache.get_or_build("init_file", init_file_spec(cfg), build) / "denoiser.pt"


def ensure_feature_map(cfg: DictConfig, cache: ArtifactCache, data: ImageData, device: torch.device,
                       progress: bool = True) -> Path:
    def build(tmp: Path) -> None:
        from ayt.training.feature_map import train_feature_map
        fm, metrics = train_feature_map(data.images.to(device), cfg.feature_map, cfg.augment,
                                        seed=int(cfg.feature_map.seed), device=device, progress=progress)
        torch.save({"kwargs": fm_kwargs(fm), "state_dict": {k: v.cpu() for k, v in fm.state_dict().items()}},
                   tmp / "feature_map.pt")
        _write_json(tmp / "metrics.json", {f"feature_map_{k}": float(v) for k, v in metrics.items()})
    return cache.get_or_build("feature_map", feature_map_spec(cfg), build) / "feature_map.pt"


def fm_kwargs(fm) -> dict:
    return {"in_channels": fm.in_channels, "resolution": fm.resolution,
            "channels": [stage[0].out_channels for stage in fm.stages], "num_labels": fm.num_labels,
            "convs_per_stage": sum(isinstance(m, torch.nn.Conv2d) for m in fm.stages[0])}


def load_feature_map(path: str | os.PathLike, device: torch.device):
    """The frozen feature map: eval mode, no parameter gradients."""
    from ayt.networks.feature_map import FeatureMap
    blob = torch.load(path, map_location="cpu", weights_only=True)
    fm = FeatureMap(**blob["kwargs"])
    fm.load_state_dict(blob["state_dict"])
    return fm.to(device).freeze()


def ensure_fid_extractor(cfg: DictConfig, cache: ArtifactCache, device: torch.device,
                         progress: bool = True) -> Path | None:
    """Classifier weights for datasets without a standard extractor; Inception's path otherwise."""
    if cfg.dataset.fid_extractor == "inception":
        return Path(cfg.fid.inception_weights) if cfg.fid.inception_weights else None

    def build(tmp: Path) -> None:
        from ayt.eval.classifier import save_classifier, train_classifier
        train, test = load_dataset(cfg.dataset, train=True), load_dataset(cfg.dataset, train=False)
        model, accuracy = train_classifier(train, test, cfg.fid.classifier, seed=int(cfg.fid.classifier.seed),
                                           device=device, progress=progress)
        save_classifier(model, str(tmp / "classifier.pt"))
        _write_json(tmp / "metrics.json", {"fid_classifier_test_accuracy": accuracy})
    return cache.get_or_build("fid_classifier", classifier_spec(cfg), build) / "classifier.pt"


def artifact_record(cfg: DictConfig) -> dict[str, Any]:
    """What a study records per trial about its shared artifacts, without building any: the
    cache key of each one `cfg` uses and the metrics it wrote (held-out feature-map label
    error, FID classifier accuracy), so a report can show them next to the FIDs."""
    cache = ArtifactCache(cfg.cache_dir)
    kinds = {"init_file": init_file_spec(cfg)} if cfg.training.init == "file" else {"pretrained": pretrained_spec(cfg)}
    if cfg.training.init == "converged":
        from ayt.training.converged import converged_spec
        kinds = {"converged": converged_spec(cfg)}
    if needs_feature_map(cfg):
        kinds["feature_map"] = feature_map_spec(cfg)
    if cfg.dataset.fid_extractor != "inception":
        kinds["fid_classifier"] = classifier_spec(cfg)
    record: dict[str, Any] = {}
    for kind, spec in kinds.items():
        path = cache.path(kind, spec)
        record[f"{kind}_hash"] = path.name
        if (path / "metrics.json").exists():
            record.update({k: v for k, v in _read_json(path / "metrics.json").items() if k.startswith(kind)})
    if cfg.dataset.fid_extractor == "inception":
        record["fid_extractor"] = str(cfg.fid.inception_weights or "torch-fidelity default")
    if "init_file" in kinds:
        record["init_file_sha256"] = kinds["init_file"]["init_file_sha256"]
    return record


def ensure_artifacts(cfg: DictConfig, progress: bool = True) -> Artifacts:
    """Build (or find) everything a run of `cfg` needs, and the FID reference statistics."""
    from ayt.eval.fid import FIDEvaluator
    device = configure_torch(cfg)
    cache = ArtifactCache(cfg.cache_dir)
    data = load_dataset(cfg.dataset, train=True)
    art = Artifacts(fid_cache=str(Path(cfg.cache_dir) / "fid"))
    if cfg.training.init == "pretrained":
        art.pretrained = str(ensure_pretrained(cfg, cache, data, device, progress))
    elif cfg.training.init == "file":
        art.pretrained = str(ensure_init_file(cfg, cache, data))
    elif cfg.training.init == "converged":
        from ayt.training.converged import ensure_converged
        art.pretrained = str(ensure_converged(cfg, cache, device, progress))
    if needs_feature_map(cfg):
        art.feature_map = str(ensure_feature_map(cfg, cache, data, device, progress))
    weights = ensure_fid_extractor(cfg, cache, device, progress)
    art.fid_weights = str(weights) if weights else None
    FIDEvaluator(data, cfg.dataset.fid_extractor, art.fid_weights, art.fid_cache, device,
                 reference_stats=cfg.fid.get("reference_stats")).ensure_reference_stats()
    for path in (art.pretrained, art.feature_map, art.fid_weights):
        if path:
            art.metrics.update(_read_json(Path(path).parent / "metrics.json"))
    return art


__all__ = ["Artifacts", "ensure_artifacts", "load_feature_map", "resolve_device", "config_hash"]
