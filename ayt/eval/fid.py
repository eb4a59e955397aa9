"""Feature extractors and reference sets through torch-fidelity (ALGORITHM §6): the metrics of
`ayt.eval.metrics` read features these extractors give, never a hand-written network.

Three feature extractors; `dataset.fid_extractor` chooses the dataset's own:

* ``inception``: torch-fidelity's ``inception-v3-compat`` (standard FID, e.g. CIFAR-10),
  weights from `fid.inception_weights` or the torch hub cache; nothing is downloaded.
* ``classifier``: ``ayt-classifier``, a `DigitClassifier` trained on the dataset's labels
  (the usual practice for MNIST-like data), registered with torch-fidelity here.
* ``dinov2``: ``ayt-dinov2`` (ayt/eval/dinov2.py), a DINOv2 ViT from `eval.dinov2_weights`,
  for the metrics that declare it (FD_DINOv2).

A `FeatureReference` is one extractor against one reference set: its Fréchet statistics and,
for metrics that need them (KID, precision/recall), its features, computed once and cached by
torch-fidelity under `cache_root`. torch-fidelity's cache key is (cache name, extractor name,
layer) and does not see the extractor's weights, so the cache name carries a hash of the
weights file and of the reference images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity import KEY_METRIC_FID, calculate_metrics, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

from ayt.data import ImageData
from ayt.errors import ConfigError
from ayt.eval.extractor import LocalFeatureExtractor
from ayt.eval.classifier import load_classifier
from ayt.eval.dinov2 import DINOV2_EXTRACTOR
from ayt.eval.metrics import FeatureSet

CLASSIFIER_EXTRACTOR = "ayt-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"


class ClassifierFeatureExtractor(LocalFeatureExtractor):
    """torch-fidelity extractor around a `DigitClassifier` saved by `save_classifier`.

    torch-fidelity feeds uint8 [B, 3, H, W]; the classifier wants its own channel count and
    [-1, 1] at its training resolution, so the conversion is undone here.
    """

    FEATURES = ("embedding", "logits")

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        vassert(
            feature_extractor_weights_path is not None,
            f"{name} needs feature_extractor_weights_path (a file written by ayt.eval.classifier.save_classifier)",
        )
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ClassifierFeatureExtractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "embedding", "kid": "embedding", "prc": "embedding", "isc": "logits"}[metric]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        self.check_input(x)
        h = x.to(torch.float32) / 127.5 - 1.0
        if self.classifier.in_channels == 1:
            h = h.mean(dim=1, keepdim=True)  # exact inverse of the grey -> RGB repeat in `to_uint8_rgb`
        res = self.classifier.resolution
        if h.shape[-2:] != (res, res):
            h = F.interpolate(h, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        embedding = self.classifier.features(h)
        out = {"embedding": embedding, "logits": self.classifier.head(embedding)}
        return tuple(out[name].to(torch.float32) for name in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # a second import (e.g. reload) must not fail
    register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


# ---------------------------------------------------------------------------------------
# Inputs and cache keys


def quantize(images: Tensor) -> Tensor:
    """float [N, C, H, W] in [-1, 1] (C = 1 or 3) -> uint8 [N, 3, H, W] on the same device, as
    torch-fidelity's extractors want (grey repeated to RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got {tuple(images.shape)}")
    u8 = ((images.detach().to(torch.float32) + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1).contiguous() if u8.shape[1] == 1 else u8


def to_uint8_rgb(images: Tensor) -> Tensor:
    """`quantize` on the CPU (torch-fidelity's datasets)."""
    return quantize(images.detach().cpu())


class UInt8ImageDataset(Dataset):
    """Items are single uint8 [3, H, W] tensors (torch-fidelity rejects (image, label) tuples)."""

    def __init__(self, images_u8: Tensor):
        self.images = images_u8

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tensor(t: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(t.shape)).encode())
    digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_inception_weights_path() -> str:
    """Where torch.hub would have cached torch-fidelity's Inception weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


# ---------------------------------------------------------------------------------------
# Extractor choice (`dataset.fid_extractor`): name -> (torch-fidelity extractor, weights file)


def _resolve_classifier(weights_path: str | None) -> tuple[str, str]:
    if weights_path is None or not os.path.isfile(weights_path):
        raise ConfigError(
            "dataset.fid_extractor",
            f"the classifier extractor needs a trained classifier weights file; got {weights_path!r}",
        )
    return CLASSIFIER_EXTRACTOR, os.path.abspath(weights_path)


def _resolve_inception(weights_path: str | None) -> tuple[str, str]:
    if weights_path is not None:
        path = os.path.abspath(os.path.expanduser(weights_path))
        if not os.path.isfile(path):
            raise ConfigError("fid.inception_weights", f"file {path} does not exist")
        return INCEPTION_EXTRACTOR, path
    path = default_inception_weights_path()
    if not os.path.isfile(path):
        raise ConfigError(
            "fid.inception_weights",
            f"no Inception weights: nothing is downloaded at run time; download {URL_INCEPTION_V3} on a "
            f"machine with internet and set fid.inception_weights to its path (or place it at {path})",
        )
    return INCEPTION_EXTRACTOR, path


def _resolve_dinov2(weights_path: str | None) -> tuple[str, str]:
    if not weights_path or not os.path.isfile(weights_path):
        raise ConfigError("eval.dinov2_weights", f"the dinov2 extractor needs a local DINOv2 weights file; "
                                                 f"got {weights_path!r}")
    return DINOV2_EXTRACTOR, os.path.abspath(weights_path)


_EXTRACTORS: dict[str, Callable[[str | None], tuple[str, str]]] = {
    "classifier": _resolve_classifier,
    "inception": _resolve_inception,
    "dinov2": _resolve_dinov2,
}


class FeatureReference:
    """One feature extractor against one reference set: the extractor network, the reference
    Fréchet statistics and (on request) the reference features, each cached.

    Reference stats are computed at most once per (weights, reference images) and shared by
    every process that points at the same `cache_root` (torch-fidelity saves atomically).
    `fid(samples)` is the single-process FID of a set of images (tests, tools); training
    evaluates through `ayt.eval.probe.EvalProbe`, which reads `extractor_network` and `reference`.
    """

    def __init__(
        self,
        reference: ImageData,
        extractor: str,
        weights_path: str | None,
        cache_root: str,
        device: torch.device | str,
        batch_size: int = 64,
        reference_stats: str | None = None,  # precomputed {mu, sigma} (.npz as EDM/AYT ship, or .pt) instead of `reference`
    ):
        if extractor not in _EXTRACTORS:
            raise ConfigError(
                "dataset.fid_extractor", f"unknown FID extractor {extractor!r}; allowed: classifier, inception "
                "(dinov2: what the fd_dinov2 metric reads)"
            )
        self.extractor = extractor
        self.feature_extractor, self.weights_path = _EXTRACTORS[extractor](weights_path)
        self.cache_root = os.path.abspath(os.path.expanduser(cache_root))
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.reference_channels = reference.channels
        # Kept as uint8 (a quarter of the float size): torch-fidelity reads it only on a cache miss.
        self._reference_u8 = to_uint8_rgb(reference.images)
        weights_sha = _sha256_file(self.weights_path)
        digest = hashlib.sha256(f"{weights_sha}:{_sha256_tensor(self._reference_u8)}".encode()).hexdigest()
        self.reference_cache_name = f"ayt-{reference.name}-{len(reference)}x{reference.resolution}-{extractor}-{digest[:16]}"
        self.images_cache_name = self.reference_cache_name      # the reference features: always of the images
        self.reference_stats = os.path.abspath(os.path.expanduser(reference_stats)) if reference_stats else None
        if self.reference_stats:
            if not os.path.isfile(self.reference_stats):
                raise ConfigError("fid.reference_stats", f"file {self.reference_stats} does not exist")
            digest = hashlib.sha256(f"{weights_sha}:{_sha256_file(self.reference_stats)}".encode()).hexdigest()
            self.reference_cache_name = f"ayt-stats-{reference.name}-{extractor}-{digest[:16]}"
        self.feature_layer = FEATURE_EXTRACTORS_REGISTRY[self.feature_extractor].get_default_feature_layer_for_metric("fid")

    @property
    def reference_stats_path(self) -> str:
        """torch-fidelity's file name for cached FID statistics (utils/metric_fid in 0.4.0)."""
        name = f"{self.reference_cache_name}-{self.feature_extractor}-stat-fid-{self.feature_layer}.pt"
        return os.path.join(self.cache_root, name)

    @property
    def reference_features_path(self) -> str:
        """torch-fidelity's file name for cached features of the reference images."""
        name = f"{self.images_cache_name}-{self.feature_extractor}-features-{self.feature_layer}.pt"
        return os.path.join(self.cache_root, name)

    def _reference_dataset(self) -> UInt8ImageDataset:
        return UInt8ImageDataset(self._reference_u8)

    def _kwargs(self) -> dict:
        return dict(
            fid=True,
            feature_extractor=self.feature_extractor,
            feature_extractor_weights_path=self.weights_path,
            cache_root=self.cache_root,
            cuda=self.device.type == "cuda",
            batch_size=self.batch_size,
            save_cpu_ram=True,  # no DataLoader worker processes (PLATFORM_NOTES)
            verbose=False,
        )

    def _on_device(self) -> contextlib.AbstractContextManager:
        """torch-fidelity moves the extractor with `.cuda()`: make that mean our device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def ensure_reference_stats(self, features: bool = False) -> str:
        """Compute and cache the reference statistics (and with `features`, the reference
        features) if missing; returns the statistics' path. Idempotent."""
        if features:
            self.ensure_reference_features()
        if os.path.isfile(self.reference_stats_path):
            return self.reference_stats_path
        os.makedirs(self.cache_root, exist_ok=True)
        if self.reference_stats:
            return self._install_reference_stats()
        # The stats half of torch-fidelity's `calculate_fid`, for input2 only: a full
        # calculate_metrics would also pay for an FID (a 2048x2048 eigensolve with Inception).
        kwargs = dict(self._kwargs(), input2=self._reference_dataset(), input2_cache_name=self.reference_cache_name)
        with self._on_device():
            extractor = create_feature_extractor(self.feature_extractor, [self.feature_layer], **kwargs)
            fid_input_id_to_statistics_cached(2, extractor, self.feature_layer, **kwargs)
        # torch-fidelity also caches the raw features (400 MB for CIFAR-10 + Inception); the
        # stats file is all that FID needs, and it is looked up before the features are.
        if not features:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.reference_features_path)
        if not os.path.isfile(self.reference_stats_path):  # torch-fidelity renamed its cache files
            raise RuntimeError(f"torch-fidelity did not write {self.reference_stats_path}")
        return self.reference_stats_path

    def ensure_reference_features(self) -> str:
        """Compute and cache the reference images' features if missing; returns their path."""
        if not os.path.isfile(self.reference_features_path):
            os.makedirs(self.cache_root, exist_ok=True)
            kwargs = dict(self._kwargs(), input2=self._reference_dataset(), input2_cache_name=self.images_cache_name)
            with self._on_device():
                extractor = create_feature_extractor(self.feature_extractor, [self.feature_layer], **kwargs)
                extract_featuresdict_from_input_id_cached(2, extractor, **kwargs)
            if not os.path.isfile(self.reference_features_path):
                raise RuntimeError(f"torch-fidelity did not write {self.reference_features_path}")
        return self.reference_features_path

    def reference(self, features: bool = False, device: torch.device | str = "cpu") -> FeatureSet:
        """The reference set as the metrics read it: float64 statistics and (with `features`)
        the features [N, D] on `device`."""
        import numpy as np
        stats = torch.load(self.ensure_reference_stats(features), map_location="cpu", weights_only=False)
        rows = None
        if features:
            rows = torch.load(self.reference_features_path, map_location="cpu", weights_only=False).to(device)
        n = len(self._reference_u8) if rows is None else int(rows.shape[0])
        return FeatureSet(n, np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64),
                          rows)

    def extractor_network(self, device: torch.device | str) -> torch.nn.Module:
        """The extractor as a module on `device` (eval mode, no gradients): called on uint8
        [B, 3, H, W], it returns (features [B, D] float32,)."""
        net = create_feature_extractor(self.feature_extractor, [self.feature_layer], cuda=False,
                                       feature_extractor_weights_path=self.weights_path, verbose=False)
        return net.to(device).eval().requires_grad_(False)

    def _install_reference_stats(self) -> str:
        """Put `fid.reference_stats` where torch-fidelity looks up cached statistics, in its
        dtypes (mu float32 as np.mean of float32 features gives, sigma float64 as np.cov)."""
        import numpy as np
        path = self.reference_stats
        try:
            blob = np.load(path) if path.endswith(".npz") else torch.load(path, map_location="cpu", weights_only=False)
            mu, sigma = np.asarray(blob["mu"], dtype=np.float32), np.asarray(blob["sigma"], dtype=np.float64)
        except Exception as err:
            raise ConfigError("fid.reference_stats", f"cannot read mu and sigma from {path} ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:120]})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ConfigError("fid.reference_stats", f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} "
                              "are not [D] and [D, D]")
        fd, tmp = tempfile.mkstemp(dir=self.cache_root, suffix=".tmp")
        os.close(fd)
        torch.save({"mu": mu, "sigma": sigma}, tmp)
        os.replace(tmp, self.reference_stats_path)
        return self.reference_stats_path

    def fid(self, samples: Tensor) -> float:
        """FID of samples [N, C, H, W] float in [-1, 1] (C as the reference) against the reference set."""
        if samples.dim() != 4 or samples.shape[1] != self.reference_channels:
            raise ValueError(
                f"samples must be [N, {self.reference_channels}, H, W] like the reference, got {tuple(samples.shape)}"
            )
        if samples.shape[0] < 2:
            raise ValueError("FID needs at least 2 samples")
        self.ensure_reference_stats()
        with self._on_device():
            metrics = calculate_metrics(
                input1=UInt8ImageDataset(to_uint8_rgb(samples)),
                input2=self._reference_dataset(),
                input2_cache_name=self.reference_cache_name,
                **self._kwargs(),
            )
        return float(metrics[KEY_METRIC_FID])


FIDEvaluator = FeatureReference     # the name its first callers (artifact preparation, tests) use


def write_random_inception_weights(path: str, seed: int = 0) -> str:
    """Save a randomly initialised state dict for torch-fidelity's `FeatureExtractorInceptionV3`.

    Lets tests run the Inception path offline. The shapes come from torch-fidelity's own
    module: it is built with loading disabled, then re-initialised (He-normal convolutions so
    activations neither vanish nor explode through the ~100 layers).
    """

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh init
            return None

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pt")
        torch.save({}, empty)
        net = _Unloaded(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.01, generator=gen)
                torch.nn.init.zeros_(module.bias)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path
