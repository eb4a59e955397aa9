"""Datasets: shapes, ranges, splits, and clear errors for missing files (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ayt.data import ImageData, available_datasets, check_dataset_available, load_dataset
from ayt.errors import ConfigError, DatasetUnavailableError

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "dataset")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(name: str, **overrides):
    cfg = OmegaConf.load(os.path.join(CONF, f"{name}.yaml"))
    return OmegaConf.merge(cfg, overrides)


def test_registry_lists_every_config_file():
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(CONF) if f.endswith(".yaml"))
    assert available_datasets() == names


def test_digits_shapes_range_labels():
    train = load_dataset(_cfg("digits"), train=True)
    test = load_dataset(_cfg("digits"), train=False)
    assert isinstance(train, ImageData)
    assert train.images.shape == (1438, 1, 16, 16) and test.images.shape == (359, 1, 16, 16)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.resolution == 16 and train.channels == 1 and train.num_classes == 10
    for split in (train, test):
        assert split.images.min() == -1.0 and split.images.max() == 1.0
        assert sorted(split.labels.unique().tolist()) == list(range(10))
    x, y = train.as_torch_dataset()[3]
    assert x.shape == (1, 16, 16) and int(y) == int(train.labels[3])


def test_digits_are_scikit_learns_read_without_importing_its_datasets():
    """The digits file is read directly (importing sklearn.datasets costs 0.7 s per process):
    the arrays are load_digits' own, and reading them imports no sklearn module. Mutations
    caught: a transposed reshape, labels off by a column, a fallback that imports anyway."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ayt.data import digits_arrays
    images, labels = digits_arrays()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(labels, bunch.target)
    code = "import sys; from ayt.data import digits_arrays; digits_arrays(); print(any(m.startswith('sklearn') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_dataset(_cfg("digits")), load_dataset(_cfg("digits"))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    test = load_dataset(_cfg("digits"), train=False)
    # no test image appears in the train split
    train_rows = {tuple(r) for r in a.images.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in test.images.flatten(1).tolist())
    assert overlap <= 5  # sklearn's digits hold a few exact duplicates, nothing more


def test_digits_other_resolution_and_plain_dict_config():
    data = load_dataset({"name": "digits", "root": None, "resolution": 8})
    assert data.images.shape[-2:] == (8, 8)
    # at the native size the values are exactly the 0..16 grid mapped to [-1, 1]
    assert torch.allclose((data.images + 1) * 8, ((data.images + 1) * 8).round(), atol=1e-5)


def test_unknown_dataset_names_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_dataset({"name": "imagenet", "resolution": 32})
    assert err.value.field == "dataset.name"
    assert "cifar10, digits, fashion_mnist, image_folder, mnist" in str(err.value)


@pytest.mark.parametrize("name,cls_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")])
def test_torchvision_dataset_missing_names_root(tmp_path, name, cls_name):
    cfg = _cfg(name, root=str(tmp_path / "nothing_here"))
    for fn in (check_dataset_available, load_dataset):
        with pytest.raises(DatasetUnavailableError) as err:
            fn(cfg)
        assert err.value.field == "dataset.root"
        assert str(tmp_path / "nothing_here") in str(err.value)
        assert f"torchvision.datasets.{cls_name}(root, download=True)" in str(err.value)


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetUnavailableError) as err:
        check_dataset_available(_cfg("mnist", root="data"))
    assert str(tmp_path / "data") in str(err.value)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_loads_from_local_files_resized_to_32(tmp_path, stand_ins, name, folder):
    """The 28x28 files come out at the preset's 32 px (a power of two, as the feature map needs)."""
    stand_ins.mnist(tmp_path, folder=folder)
    check_dataset_available(_cfg(name, root=str(tmp_path)))
    train = load_dataset(_cfg(name, root=str(tmp_path)), train=True)
    assert _cfg(name).resolution == 32
    assert train.images.shape == (6, 1, 32, 32) and train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert train.images.min() >= -1 and train.images.max() <= 1
    native = load_dataset(_cfg(name, root=str(tmp_path), resolution=28), train=False)
    assert native.images.shape == (4, 1, 28, 28)
    assert torch.allclose((native.images + 1) * 127.5, ((native.images + 1) * 127.5).round(), atol=1e-3)
    small = load_dataset(_cfg(name, root=str(tmp_path), resolution=14), train=False)
    assert small.images.shape == (4, 1, 14, 14)


def test_image_folder_recursive_resize_crop(tmp_path, stand_ins):
    stand_ins.pngs(tmp_path, [(40, 30), (20, 20), (64, 100)])
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = load_dataset(_cfg("image_folder", root=str(tmp_path), resolution=16))
    assert rgb.images.shape == (3, 3, 16, 16) and rgb.num_classes == 1
    assert rgb.labels.tolist() == [0, 0, 0]
    assert rgb.images.min() >= -1 and rgb.images.max() <= 1
    grey = load_dataset(_cfg("image_folder", root=str(tmp_path), resolution=8, channels=1))
    assert grey.images.shape == (3, 1, 8, 8)


def test_image_folder_centre_crop_keeps_the_middle(tmp_path):
    # a 30x10 image: white middle third, black sides; centre crop to 10x10 is all white
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "x.png")
    data = load_dataset(_cfg("image_folder", root=str(tmp_path), resolution=10, channels=1))
    assert torch.all(data.images == 1.0)


def test_image_folder_missing_or_empty_root(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_dataset_available(_cfg("image_folder"))  # root: ??? in the yaml
    assert err.value.field == "dataset.root"
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(DatasetUnavailableError) as err:
            load_dataset(_cfg("image_folder", root=str(root)))
        assert err.value.field == "dataset.root" and str(root) in str(err.value)


def test_bad_resolution_and_channels():
    with pytest.raises(ConfigError, match="dataset.resolution"):
        check_dataset_available({"name": "digits", "resolution": "16"})
    with pytest.raises(ConfigError, match="dataset.channels"):
        check_dataset_available({"name": "image_folder", "root": "/", "resolution": 16, "channels": 2})
