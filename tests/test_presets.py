"""Every preset a user can name from `conf/` composes and validates, as `python -m ayt.train`
checks it before any work: each dataset, experiment, loss and feature-map preset (enumerated
from the yaml files, so a new preset is covered without editing this file), with local
stand-ins for the files a dataset or a loss needs. And a newcomer's `dataset=mnist` run on
MNIST-format files trains at 32 px.

Hydra composes a config in ~0.3 s here, so the axes are crossed in pairs rather than all four
at once: every dataset with every experiment and every loss, every experiment with a loss other
than its own, every feature map at both resolutions the datasets have (16 and 32 px)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ayt.config import load_config
from ayt.errors import ConfigError
from ayt.preflight import check_locations

CONF = Path(__file__).resolve().parent.parent / "conf"
README_DATASETS = ("digits", "cifar10", "mnist", "fashion_mnist", "image_folder")  # README "Layout"


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _preset(group: str, name: str):
    return OmegaConf.load(CONF / group / f"{name}.yaml")


DATASETS, EXPERIMENTS = _names("dataset"), [None] + _names("experiment")
LOSSES, FEATURE_MAPS = _names("loss"), _names("feature_map")


@pytest.fixture(scope="module")
def local_files(tmp_path_factory, stand_ins):
    """One directory with every dataset's stand-in files, weight stand-ins and an out_dir."""
    root = tmp_path_factory.mktemp("presets")
    stand_ins.mnist(root, "MNIST")
    stand_ins.mnist(root, "FashionMNIST")
    stand_ins.cifar10(root)
    stand_ins.pngs(root / "images", [(40, 30), (20, 20)])
    for name in ("vgg16.pth", "lpips_vgg.pth", "denoiser.pt"):
        (root / name).write_bytes(b"stand-in")   # validation checks that they exist, nothing more
    return root


def _overrides(root: Path, dataset: str, experiment: str | None = None, loss: str | None = None,
               feature_map: str | None = None) -> list[str]:
    """What a user types for this combination, plus the local files its presets ask for."""
    args = [f"dataset={dataset}", f"out_dir={root / 'out'}"]
    preset = _preset("dataset", dataset)
    if OmegaConf.is_missing(preset, "root") or preset.get("root") is not None:   # digits ships with scikit-learn
        args.append(f"dataset.root={root / 'images' if dataset == 'image_folder' else root}")
    if experiment:
        args.append(f"experiment={experiment}")
        if OmegaConf.select(_preset("experiment", experiment), "training.init") == "file":
            args.append(f"training.init_file={root / 'denoiser.pt'}")
    if loss:
        args.append(f"loss={loss}")
        if _preset("loss", loss).get("name") == "lpips":
            args += [f"loss.vgg_weights={root / 'vgg16.pth'}", f"loss.lin_weights={root / 'lpips_vgg.pth'}"]
    if feature_map:
        args.append(f"feature_map={feature_map}")
    return args


def _validate(overrides: list[str]):
    """`python -m ayt.train`'s checks before any work: the validated config, then every path."""
    cfg = load_config(overrides)
    check_locations(cfg, uses_ray=False)
    return cfg


def test_the_axes_cover_what_the_readme_advertises():
    assert set(README_DATASETS) <= set(DATASETS)
    assert {"smoke", "quick", "study_cpu", "cifar10_paper"} <= set(EXPERIMENTS)
    assert {"pseudo_huber", "l2", "l1", "lpips", "mfd", "mixed"} <= set(LOSSES)
    assert {"small", "base", "wide", "vgg16"} <= set(FEATURE_MAPS)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda e: e or "no-experiment")
@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_with_experiment(local_files, dataset, experiment):
    cfg = _validate(_overrides(local_files, dataset, experiment=experiment))
    assert cfg.dataset.name == dataset          # the user's dataset= wins over an experiment's default
    res = int(cfg.dataset.resolution)
    assert res & (res - 1) == 0, f"{dataset}: {res} px is not a power of two"


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_with_loss(local_files, dataset, loss):
    cfg = _validate(_overrides(local_files, dataset, loss=loss))
    assert cfg.dataset.name == dataset and cfg.loss.name == _preset("loss", loss).name


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e], ids=str)
@pytest.mark.parametrize("loss", ["pseudo_huber", "lpips"])
def test_experiment_with_a_loss_other_than_its_own(local_files, experiment, loss):
    cfg = _validate(_overrides(local_files, "digits", experiment=experiment, loss=loss))
    assert cfg.loss.name == loss                # the user's loss= wins over cifar10_paper's mfd


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dataset", ["digits", "mnist"])     # 16 px (4 stages) and 32 px (5 stages)
def test_dataset_with_feature_map(local_files, dataset, feature_map):
    cfg = _validate(_overrides(local_files, dataset, loss="mfd", feature_map=feature_map))
    assert cfg.feature_map.name == _preset("feature_map", feature_map).name
    assert len(cfg.feature_map.channels) >= int(math.log2(cfg.dataset.resolution))


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_mnist_presets_resize_to_32_px_even_without_a_feature_map(local_files, dataset):
    for loss in ("mfd", "pseudo_huber"):
        assert int(_validate(_overrides(local_files, dataset, loss=loss)).dataset.resolution) == 32


def test_native_28_px_validates_when_the_loss_uses_no_feature_map(local_files):
    """The power-of-two rule is the feature map's (it halves the image down to 1x1)."""
    args = _overrides(local_files, "mnist") + ["dataset.resolution=28"]
    assert int(_validate(args + ["loss=pseudo_huber"]).dataset.resolution) == 28
    with pytest.raises(ConfigError, match=r"^dataset\.resolution: the feature map needs a power of two"):
        _validate(args + ["loss=mfd"])


@pytest.mark.parametrize("overrides, field, words", [
    (["loss=lpips"], "loss.vgg_weights", "LPIPS needs local VGG16 and LPIPS v0.1 weights"),
    (["experiment=cifar10_paper"], "training.init_file", "required with training.init=file"),
    (["dataset=mnist", "dataset.root=/nonexistent/mnist"], "dataset.root", "torchvision.datasets.MNIST(root, download=True)"),
    (["dataset=image_folder"], "dataset.root", "required for dataset 'image_folder'"),
])
def test_a_preset_without_its_local_files_names_them(tmp_path, overrides, field, words):
    with pytest.raises(ConfigError) as info:
        _validate(overrides + [f"out_dir={tmp_path}"])
    assert info.value.field == field and words in str(info.value) and "\n" not in str(info.value)


# A newcomer's first MNIST run: `experiment=smoke dataset=mnist dataset.root=...` with the
# smoke preset's stages cut to a few iterations (the pipeline, not the numbers, is under test).
TINY = ["experiment=smoke", "dataset=mnist", "scaling.backend=local", "progress=false", "name=mnist-tiny",
        "pretrain.iterations=4", "pretrain.batch_size=16", "feature_map.iterations=4", "feature_map.batch_size=32",
        "feature_map.p_ramp_iterations=2", "fid.classifier.iterations=4", "fid.classifier.batch_size=32",
        "fid.num_samples=64", "fid.batch_size=64", "batch_size=8", "training.iterations=4",
        "training.eval_every=2", "training.checkpoint_every=2", "training.log_every=1",
        "diagnostics.tangent.probe_size=8"]


def test_newcomer_mnist_run_trains_at_32_px(tmp_path, stand_ins):
    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from ayt.data import load_dataset
    from ayt.train import main

    # 28x28 idx files; 128 training images: more than the FID classifier's 64 features, so the
    # reference statistics have a full-rank covariance.
    root = stand_ins.mnist(tmp_path / "data", n_train=128, n_test=32, digits=True)
    args = TINY + [f"dataset.root={root}", f"out_dir={tmp_path / 'out'}"]
    cfg = load_config(args)
    assert cfg.loss.name == "mfd" and cfg.dataset.resolution == 32
    assert load_dataset(cfg.dataset).images.shape == (128, 1, 32, 32)

    assert main(args) == 0
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "mnist" and run.data.params["dataset.resolution"] == "32"
    for key in ("eval/fid_1step", "eval/fid_2step", "train/loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history and all(math.isfinite(m.value) for m in history), key
    fid = client.get_metric_history(run.info.run_id, "eval/fid_1step")
    assert [m.step for m in fid] == [2, 4] and all(m.value > 0 for m in fid)
    (fm_file,) = (tmp_path / "out" / "cache").rglob("feature_map.pt")
    assert torch.load(fm_file, weights_only=True)["kwargs"]["resolution"] == 32   # MFD's map is for 32 px
    grid = Image.open(client.download_artifacts(run.info.run_id, "samples_1step.png", str(tmp_path)))
    assert grid.width == 8 * 64 + 9          # 64 samples of 32 px, enlarged x2 for the grid, 1-px padding
