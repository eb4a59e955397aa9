"""Datasets as in-memory image tensors in [-1, 1] (config group `conf/dataset/`).

Every dataset is small enough to hold in memory as float32 (CIFAR-10 train is ~0.6 GB),
which keeps the training step free of data-loading machinery. Nothing is ever
downloaded: torchvision datasets must already sit under `dataset.root`, and a missing
file is a `DatasetUnavailableError` that names `dataset.root` and says how to get it.

Add a dataset with::

    @register_dataset("name", check=optional_cheap_check)
    def _build(cfg, train: bool) -> ImageData: ...
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import TensorDataset

from ayt.errors import ConfigError, DatasetUnavailableError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageData:
    """One split of a dataset, in memory.

    images: [N, C, H, W] float32 in [-1, 1] (CPU); labels: [N] int64 in [0, num_classes).
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_torch_dataset(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels)


Builder = Callable[[Any, bool], ImageData]
Checker = Callable[[Any], None]


@dataclass(frozen=True)
class _DatasetSpec:
    build: Builder
    check: Checker | None


_DATASETS: dict[str, _DatasetSpec] = {}


def register_dataset(name: str, check: Checker | None = None) -> Callable[[Builder], Builder]:
    """Register `builder(cfg_dataset, train) -> ImageData` under `dataset.name == name`.

    `check(cfg_dataset)` raises DatasetUnavailableError cheaply (file existence only), so
    config validation can fail before any work starts.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = _DatasetSpec(builder, check)
        return builder

    return decorator


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def _as_config(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _spec(cfg: DictConfig) -> _DatasetSpec:
    name = cfg.get("name")
    if name not in _DATASETS:
        raise ConfigError("dataset.name", f"unknown dataset {name!r}; allowed: {', '.join(available_datasets())}")
    return _DATASETS[name]


def load_dataset(cfg_dataset: Any, train: bool = True) -> ImageData:
    """Load the train (or test) split named by `cfg_dataset.name`, resized to `cfg_dataset.resolution`."""
    cfg = _as_config(cfg_dataset)
    spec = _spec(cfg)
    if spec.check is not None:
        spec.check(cfg)
    data = spec.build(cfg, train)
    assert data.images.dtype == torch.float32 and data.images.dim() == 4, data.images.shape
    return data


def check_dataset_available(cfg_dataset: Any) -> None:
    """Raise ConfigError/DatasetUnavailableError if the dataset cannot be loaded; reads no image data."""
    cfg = _as_config(cfg_dataset)
    spec = _spec(cfg)
    _resolution(cfg)
    if spec.check is not None:
        spec.check(cfg)


# ---------------------------------------------------------------------------------------
# Helpers


def _resolution(cfg: DictConfig) -> int:
    res = cfg.get("resolution")
    if not isinstance(res, int) or isinstance(res, bool) or res < 4:
        raise ConfigError("dataset.resolution", f"must be an integer >= 4, got {res!r}")
    return res


def _root(cfg: DictConfig) -> str:
    """`dataset.root` as an absolute path: Ray Tune changes each trial's working directory."""
    if OmegaConf.is_missing(cfg, "root") or cfg.get("root") in (None, ""):
        raise ConfigError("dataset.root", f"required for dataset {cfg.get('name')!r} (a directory path)")
    return os.path.abspath(os.path.expanduser(str(cfg.root)))


def _resize(images: Tensor, resolution: int) -> Tensor:
    """Bilinear resize of [N, C, H, W] float images to a square `resolution` (no-op if equal)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    out = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0)


def _uint8_to_float(images: Tensor) -> Tensor:
    """uint8 [N, C, H, W] in 0..255 -> float32 in [-1, 1]."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 digits, shipped inside scikit-learn (works offline)

DIGITS_TEST_EVERY = 5  # every 5th image (index % 5 == 4) is the test split: fixed and deterministic


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8] in 0..16 and labels. Its data file is read as
    `load_digits` reads it, without importing `sklearn.datasets` (0.7 s in every trial and
    worker process that loads the default dataset); `load_digits` itself if the file moved."""
    spec = importlib.util.find_spec("sklearn")          # locates the package, imports nothing
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits
        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@register_dataset("digits")
def _build_digits(cfg: DictConfig, train: bool) -> ImageData:
    digit_images, digit_labels = digits_arrays()
    images = torch.from_numpy(digit_images.astype(np.float32)).unsqueeze(1)  # [1797, 1, 8, 8], 0..16
    labels = torch.from_numpy(digit_labels.astype(np.int64))
    is_test = torch.arange(len(labels)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    keep = ~is_test if train else is_test
    images = images[keep] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = _resize(images, _resolution(cfg)).contiguous()
    return ImageData(images=images, labels=labels[keep].contiguous(), num_classes=10, name="digits")


# ---------------------------------------------------------------------------------------
# torchvision datasets (download=False: files must already be under root)

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def _unavailable(label: str, cls_name: str, root: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        "dataset.root",
        f"{label} files not found under {root}; download them on a machine with internet "
        f"(torchvision.datasets.{cls_name}(root, download=True)) and copy the folder there",
    )


def _torchvision_checker(label: str, cls_name: str, subdir: str, files: tuple[str, ...]) -> Checker:
    def check(cfg: DictConfig) -> None:
        root = _root(cfg)
        if not all(os.path.isfile(os.path.join(root, subdir, f)) for f in files):
            raise _unavailable(label, cls_name, root)

    return check


def _load_torchvision(cfg: DictConfig, train: bool, label: str, cls_name: str) -> tuple[Tensor, Tensor]:
    """Returns uint8 images [N, C, H, W] and int64 labels, straight from the torchvision arrays."""
    import torchvision.datasets as tvd

    root = _root(cfg)
    try:
        ds = getattr(tvd, cls_name)(root, train=train, download=False)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise _unavailable(label, cls_name, root) from err
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # MNIST [N,H,W]; CIFAR [N,H,W,C]
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return images.contiguous(), labels


def _register_torchvision(name: str, label: str, cls_name: str, subdir: str, files: tuple[str, ...]) -> None:
    @register_dataset(name, check=_torchvision_checker(label, cls_name, subdir, files))
    def _build(cfg: DictConfig, train: bool) -> ImageData:
        images, labels = _load_torchvision(cfg, train, label, cls_name)
        images = _resize(_uint8_to_float(images), _resolution(cfg)).contiguous()
        return ImageData(images=images, labels=labels, num_classes=10, name=name)


_register_torchvision("mnist", "MNIST", "MNIST", os.path.join("MNIST", "raw"), _MNIST_FILES)
_register_torchvision(
    "fashion_mnist", "FashionMNIST", "FashionMNIST", os.path.join("FashionMNIST", "raw"), _MNIST_FILES
)
_register_torchvision("cifar10", "CIFAR10", "CIFAR10", "cifar-10-batches-py", _CIFAR10_FILES)


# ---------------------------------------------------------------------------------------
# image_folder: every image under root (recursively), one class


def _image_files(root: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(root, followlinks=True):
        files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)  # sorted: the same order (and so the same FID reference hash) on every machine


def _folder_channels(cfg: DictConfig) -> int:
    channels = cfg.get("channels", 3)
    if channels not in (1, 3):
        raise ConfigError("dataset.channels", f"must be 1 or 3, got {channels!r}")
    return channels


def _check_image_folder(cfg: DictConfig) -> None:
    root = _root(cfg)
    _folder_channels(cfg)
    if not os.path.isdir(root):
        raise DatasetUnavailableError("dataset.root", f"image folder {root} does not exist")
    if not _image_files(root):
        raise DatasetUnavailableError(
            "dataset.root", f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}"
        )


@register_dataset("image_folder", check=_check_image_folder)
def _build_image_folder(cfg: DictConfig, train: bool) -> ImageData:
    """Resize the short side to `resolution`, then centre-crop (torchvision's Resize + CenterCrop).

    There is no held-out split for an unlabeled folder: train and test are the same images.
    """
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

    res = _resolution(cfg)
    mode = {1: "L", 3: "RGB"}[_folder_channels(cfg)]
    transform = Compose([Resize(res, antialias=True), CenterCrop(res), PILToTensor()])
    images = []
    for path in _image_files(_root(cfg)):
        with Image.open(path) as img:
            images.append(transform(img.convert(mode)))
    images_u8 = torch.stack(images)
    labels = torch.zeros(len(images), dtype=torch.int64)
    return ImageData(images=_uint8_to_float(images_u8), labels=labels, num_classes=1, name="image_folder")
