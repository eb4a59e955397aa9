"""The feature map φ and its training on augmentation labels (ALGORITHM §4-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ayt.errors import ConfigError
from ayt.method.augment import AugmentPipeline
from ayt.networks.feature_map import FeatureMap
from ayt.training.feature_map import ramped_p, train_feature_map, validate_feature_map

CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def augment_cfg(name: str, rot_max: float = 1.0, **overrides):
    """An augment preset with `rot_max` standing in for the dataset's augment_rot_max."""
    root = OmegaConf.create({"dataset": {"augment_rot_max": rot_max},
                             "augment": OmegaConf.load(CONF / "augment" / f"{name}.yaml")})
    cfg = OmegaConf.create(OmegaConf.to_container(root, resolve=True)["augment"])
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def feature_map_cfg(preset: str = "base", **overrides):
    cfg = OmegaConf.load(CONF / "feature_map" / f"{preset}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits (bundled, offline), bilinearly resized to 16x16, in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1


@pytest.mark.parametrize("resolution, stages", [(16, 4), (32, 5), (8, 3)])
def test_stage_count_follows_resolution(resolution, stages):
    torch.manual_seed(0)
    net = FeatureMap(3, resolution, [4, 8, 8, 8, 8], num_labels=15)
    assert net.num_stages == stages
    feats = net.features(torch.randn(2, 3, resolution, resolution))
    assert len(feats) == stages + 1
    for i, f in enumerate(feats[:-1]):
        assert f.shape[-1] == resolution // 2 ** (i + 1)
    assert feats[-2].shape[-2:] == (1, 1)
    assert feats[-1].shape == (2, 15, 1, 1)  # the head, with spatial axes for the MFD norm
    assert net(torch.randn(2, 3, resolution, resolution)).shape == (2, 15)


def test_features_end_with_the_forward_output():
    torch.manual_seed(0)
    net = FeatureMap(1, 16, [4, 8, 8, 8], num_labels=7, convs_per_stage=1).freeze()
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(net.features(x)[-1][:, :, 0, 0], net(x))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4


def test_convs_per_stage_and_channel_use():
    net = FeatureMap(3, 16, [4, 8, 16, 32, 64], num_labels=2, convs_per_stage=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12 and convs[-1].out_channels == 32  # only the first 4 entries used
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 12


def test_zero_labels_keeps_the_stage_features():
    net = FeatureMap(3, 16, [4, 8, 8, 8], num_labels=0)
    x = torch.randn(2, 3, 16, 16)
    assert net(x).shape == (2, 0)
    feats = net.features(x)
    assert len(feats) == 5 and feats[-1].shape == (2, 0, 1, 1) and feats[0].shape == (2, 4, 8, 8)


def test_bad_architectures_name_the_field():
    with pytest.raises(ConfigError, match=r"^feature_map\.channels: needs at least 5 entries for resolution 32"):
        FeatureMap(3, 32, [8, 8, 8, 8], num_labels=3)
    with pytest.raises(ConfigError, match=r"power of two"):
        FeatureMap(3, 24, [8] * 8, num_labels=3)


def test_freeze_keeps_input_gradients():
    net = FeatureMap(1, 16, [4, 8, 8, 8], num_labels=3)
    assert net.freeze() is net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    sum(f.square().sum() for f in net.features(x)).backward()  # MFD differentiates w.r.t. images
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_p_ramp():
    assert ramped_p(0, 0.15, 100) == 0.0
    assert ramped_p(50, 0.15, 100) == pytest.approx(0.075)
    assert ramped_p(100, 0.15, 100) == ramped_p(10_000, 0.15, 100) == pytest.approx(0.15)
    assert ramped_p(0, 0.15, 0) == 0.15


@pytest.mark.parametrize("key, value, field", [
    ("batch_size", 1, "feature_map.batch_size"),
    ("holdout", 0.0, "feature_map.holdout"),
    ("holdout", 1.0, "feature_map.holdout"),
    ("lr", -1e-3, "feature_map.lr"),
    ("iterations", -1, "feature_map.iterations"),
    ("channels", [8, 0], "feature_map.channels"),
    ("convs_per_stage", 0, "feature_map.convs_per_stage"),
])
def test_feature_map_config_validation(key, value, field):
    validate_feature_map(feature_map_cfg())
    with pytest.raises(ConfigError) as err:
        validate_feature_map(feature_map_cfg(**{key: value}))
    assert err.value.field == field


def test_training_is_deterministic_given_the_seed(digits):
    cfg = feature_map_cfg(channels=[4, 8, 8, 8], convs_per_stage=1, iterations=5, batch_size=16, p_ramp_iterations=2)
    aug = augment_cfg("geo_clr_deg", p=0.5)
    runs = [train_feature_map(digits[:200], cfg, aug, seed=s, device="cpu", progress=False) for s in (1, 1, 2)]
    (a, ma), (b, mb), (c, _) = runs
    assert ma == mb and ma["num_labels"] == 12 and ma["iterations"] == 5
    for (name, ta), tb, tc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not all(torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(), c.state_dict().values()))
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_idt_trains_nothing_but_sets_batchnorm_statistics(digits):
    cfg = feature_map_cfg(channels=[4, 8, 8, 8], convs_per_stage=1, iterations=50, batch_size=32)
    net, metrics = train_feature_map(digits[:100], cfg, augment_cfg("idt"), seed=0, device="cpu", progress=False)
    quality = {k: v for k, v in metrics.items() if not k.startswith("align_") and k != "parameters"}
    assert quality == {"label_mse": 0.0, "zero_mse": 0.0, "num_labels": 0, "iterations": 0, "train_images": 0}
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.abs().sum() > 0 and not net.training
    assert len(net.features(digits[:2])) == 5


def test_trained_feature_map_predicts_augmentation_labels(digits):
    """A brief run on digits beats the constant-zero predictor by far, on images it never saw."""
    train, unseen = digits[:1500], digits[1500:]
    aug = augment_cfg("geo", p=0.5)
    # The default lr (1e-3), small channels, one conv per stage: ~7 s on 2 cores. Seeds 0-3 all give
    # label_mse ≈ 0.60·zero_mse, scale ≈ 0.3 and rotate_cos ≈ 0.7 of their best-constant error.
    cfg = feature_map_cfg(channels=[8, 16, 32, 32], convs_per_stage=1, iterations=800, batch_size=64,
                          lr=1e-3, p_ramp_iterations=100, holdout=0.1)
    net, metrics = train_feature_map(train, cfg, aug, seed=0, device="cpu", progress=False)
    assert metrics["num_labels"] == 7 and metrics["iterations"] == 800
    assert metrics["train_images"] == 800 * 64
    assert metrics["label_mse"] < 0.7 * metrics["zero_mse"], metrics
    assert 0.2 < metrics["r2_geo"] == metrics["r2"] < 1, metrics       # geo only: one family, all labels
    assert "r2_clr" not in metrics and "r2_deg" not in metrics

    # Per label on images outside the training call: the net reads the image (a net blind to
    # it can at best predict each label's mean: that still leaves the scale error at ~0.5).
    pipeline = AugmentPipeline(aug, 1)
    x_aug, labels = pipeline(unseen.repeat(4, 1, 1, 1), 0.5, torch.Generator().manual_seed(123))
    with torch.no_grad():
        err = (net(x_aug) - labels).square().mean(0)
    zero = labels.square().mean(0)
    best_constant = labels.var(0)
    names = pipeline.label_names
    i = names.index("scale")
    assert err[i] < 0.5 * best_constant[i] and err[i] < 0.5 * zero[i], (err, zero)
    i = names.index("rotate_cos")  # slower to learn (orientation of a digit), but under way
    assert err[i] < 0.85 * best_constant[i] and err[i] < 0.6 * zero[i], (err, zero)


# Parameters per preset (geo_clr_deg labels: 12 on 1-channel digits, 15 on RGB) and training images.
PRESETS = {
    "small": (54_204, 73_215, 38_400),
    "base": (584_556, 881_199, 512_000),
    "wide": (2_330_316, 3_513_423, 768_000),
    "vgg16": (7_830_540, 14_915_727, 204_800_000),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_size_presets_parameter_counts(preset):
    from ayt.config import compose_config
    digits_params, cifar_params, images = PRESETS[preset]
    for dataset, channels, expected in (("digits", 1, digits_params), ("cifar10", 3, cifar_params)):
        cfg = compose_config([f"feature_map={preset}", f"dataset={dataset}"])
        labels = AugmentPipeline(cfg.augment, channels).num_labels
        with torch.device("meta"):
            net = FeatureMap(channels, cfg.dataset.resolution, list(cfg.feature_map.channels), labels,
                             cfg.feature_map.convs_per_stage)
        assert sum(p.numel() for p in net.parameters()) == expected, (preset, dataset)
        assert cfg.feature_map.iterations * cfg.feature_map.batch_size == images
    if preset == "vgg16":          # VGG16's convolutions have 14.7M parameters; AYT's recipe
        assert (cfg.feature_map.lr, cfg.feature_map.p_ramp_iterations) == (1e-4, 50_000)


def test_presets_keep_key_overrides_and_experiments_pick_theirs():
    from ayt.config import compose_config
    cfg = compose_config(["experiment=study_cpu", "feature_map.iterations=1000", "feature_map.channels=[8,8,8,8]"])
    assert cfg.feature_map.name == "small" and cfg.feature_map.iterations == 1000
    assert list(cfg.feature_map.channels) == [8, 8, 8, 8] and cfg.feature_map.batch_size == 128
    assert compose_config(["experiment=study_cpu", "feature_map=wide"]).feature_map.name == "wide"
    assert compose_config(["experiment=cifar10_paper"]).feature_map.name == "vgg16"
    assert compose_config([]).feature_map.name == "base"


def test_r2_per_family_is_one_minus_mse_over_label_variance(digits):
    """A map that predicts nothing useful has R² <= 0 in every family; training lifts geo and
    deg well above 0. R² is computed against each label's own held-out mean."""
    aug = augment_cfg("geo_clr_deg", p=0.5)
    cfg = feature_map_cfg(channels=[8, 16, 16, 16], convs_per_stage=1, batch_size=64, p_ramp_iterations=0,
                          holdout=0.2)
    _, untrained = train_feature_map(digits[:500], feature_map_cfg(**{**cfg, "iterations": 1}), aug, seed=0,
                                     device="cpu", progress=False)
    _, trained = train_feature_map(digits[:500], feature_map_cfg(**{**cfg, "iterations": 200}), aug, seed=0,
                                   device="cpu", progress=False)
    for family in ("geo", "clr", "deg"):
        assert untrained[f"r2_{family}"] < 0.05, untrained
    # At 300 iterations (600 images): R² geo 0.08, clr 0.48, deg 0.52; geo (rotation of digits) learns last.
    assert trained["r2_clr"] > 0.2 and trained["r2_deg"] > 0.2 and trained["r2"] > untrained["r2"] + 0.2, trained
    assert trained["train_images"] == 200 * 64 and trained["parameters"] == 6204


def test_alignment_cosines_pseudo_huber_is_one_mfd_below_and_map_dependent(digits):
    from ayt.method.losses import ManifoldFeatureDistance, PseudoHuber
    from ayt.training.alignment import ERRORS, alignment_cosines
    images = digits[:64]
    assert alignment_cosines(PseudoHuber(0.0), images) == pytest.approx({name: 1.0 for name in ERRORS}, abs=1e-5)
    maps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = FeatureMap(1, 16, [4, 8, 8, 8], num_labels=12)
        with torch.no_grad():
            net.train()(digits[:256])            # BatchNorm statistics from the data
        maps.append(alignment_cosines(ManifoldFeatureDistance(net.freeze()), images))
    for cosines in maps:
        assert set(cosines) == {"noise", "blur", "mixup", "shift", "mean"}
        assert all(-1 <= c < 0.99 for c in cosines.values()), cosines
    assert any(abs(maps[0][k] - maps[1][k]) > 1e-3 for k in ERRORS), maps
