"""Augmentation pipeline: labels, label layout, the geometry it really applies, validation (ALGORITHM §5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ayt.errors import ConfigError
from ayt.method.augment import AugmentPipeline, validate_augment

CONF = Path(__file__).resolve().parents[1] / "conf" / "augment"


def preset(name: str, rot_max: float = 1.0, **overrides):
    """An augment preset with `rot_max` standing in for the dataset's augment_rot_max."""
    root = OmegaConf.create({"dataset": {"augment_rot_max": rot_max}, "augment": OmegaConf.load(CONF / f"{name}.yaml")})
    cfg = OmegaConf.create(OmegaConf.to_container(root, resolve=True)["augment"])
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def images(batch: int = 16, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize(
    "name, channels, count",
    [("geo_clr_deg", 3, 15), ("geo_clr_deg", 1, 12), ("geo_clr", 3, 12), ("geo_clr", 1, 9),
     ("geo", 3, 7), ("deg", 1, 3), ("geo_deg", 3, 10), ("idt", 3, 0), ("idt", 1, 0)],
)
def test_label_counts(name, channels, count):
    pipeline = AugmentPipeline(preset(name), channels)
    assert pipeline.num_labels == count
    assert len(pipeline.label_names) == count
    x, labels = pipeline(images(channels=channels), 1.0, torch.Generator().manual_seed(1))
    assert labels.shape == (16, count)


def test_label_layout_is_canonical_whatever_the_family_order():
    a = AugmentPipeline(preset("geo_clr_deg"), 3)
    b = AugmentPipeline(preset("geo_clr_deg", families=["deg", "clr", "geo"]), 3)
    assert a.label_names == b.label_names
    assert a.label_names[:3] == ["scale", "rotate_cos", "rotate_sin"]
    assert a.label_names[-3:] == ["blur", "mixup", "noise"]


def test_idt_is_identity():
    x = images()
    out, labels = AugmentPipeline(preset("idt", p=1.0), 3)(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and labels.shape == (16, 0)


def test_p_zero_gives_zero_labels_and_untouched_images():
    x = images()
    out, labels = AugmentPipeline(preset("geo_clr_deg"), 3)(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert torch.count_nonzero(labels) == 0


@pytest.mark.parametrize("family, names", [  # one family at a time (the geo_clr_deg preset, cut down)
    ("geo", ["scale", "rotate_cos", "rotate_sin", "aniso_cos", "aniso_sin", "translate_x", "translate_y"]),
    ("clr", ["brightness", "contrast", "hue_cos", "hue_sin", "saturation"]),
    ("deg", ["blur", "mixup", "noise"]),
])
def test_only_the_applied_augmentation_has_labels(family, names):
    # One augmentation drawn at p=1, every other one drawn at p=0.
    x = images()
    pipeline = AugmentPipeline(preset("geo_clr_deg", families=[family]), 3)
    assert pipeline.label_names == names
    g = torch.Generator().manual_seed(3)
    for keep in pipeline.augmentations:
        none = pipeline.sample_params(x.shape, 0.0, g)
        full = pipeline.sample_params(x.shape, 1.0, g)
        params = {aug.name: (full if aug is keep else none)[aug.name] for aug in pipeline.augmentations}
        out, labels = pipeline.apply(x, params)
        columns = [i for i, n in enumerate(pipeline.label_names) if n in keep.label_names]
        others = [i for i in range(len(names)) if i not in columns]
        assert torch.count_nonzero(labels[:, others]) == 0, keep.name
        assert (labels[:, columns] != 0).any(dim=1).all(), keep.name  # every image got it
        assert not torch.allclose(out, x), keep.name  # and it changed the images


def test_each_augmentation_applied_with_probability_p():
    pipeline = AugmentPipeline(preset("geo_clr_deg"), 3)
    x = images(batch=2000, size=8)
    _, labels = pipeline(x, 0.3, torch.Generator().manual_seed(0))
    start = 0
    for aug in pipeline.augmentations:
        applied = (labels[:, start : start + aug.num_labels] != 0).any(dim=1).float().mean().item()
        assert abs(applied - 0.3) < 0.05, aug.name  # binomial std ~0.01
        start += aug.num_labels


def test_call_is_deterministic_given_a_generator():
    pipeline = AugmentPipeline(preset("geo_clr_deg"), 3)
    x = images()
    a = pipeline(x, 0.5, torch.Generator().manual_seed(7))
    b = pipeline(x, 0.5, torch.Generator().manual_seed(7))
    c = pipeline(x, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def _only(pipeline, x, name, **values):
    """Parameters that apply only augmentation `name`, with the given parameter values."""
    params = pipeline.sample_params(x.shape, 0.0)
    for key, value in values.items():
        params[name][key] = torch.as_tensor(value, dtype=torch.float32).expand_as(params[name][key]).clone()
    return pipeline.apply(x, params)


def test_rotation_by_quarter_turn_is_rot90_with_its_labels():
    pattern = torch.zeros(1, 1, 8, 8)
    pattern[0, 0, 1, 2], pattern[0, 0, 5, 6], pattern[0, 0, 6, 1] = 1.0, 0.5, -0.7
    pipeline = AugmentPipeline(preset("geo"), 1)
    out, labels = _only(pipeline, pattern, "rotate", theta=math.pi / 2)
    assert torch.allclose(out, torch.rot90(pattern, 1, dims=(-2, -1)), atol=1e-5)
    assert not torch.allclose(out, torch.rot90(pattern, -1, dims=(-2, -1)), atol=1e-2)
    rotate = [pipeline.label_names.index("rotate_cos"), pipeline.label_names.index("rotate_sin")]
    assert torch.allclose(labels[0, rotate], torch.tensor([math.cos(math.pi / 2) - 1, 1.0]))
    assert torch.count_nonzero(labels[0, [i for i in range(7) if i not in rotate]]) == 0


def test_rotation_labels_are_cos_minus_one_and_sin():
    pipeline = AugmentPipeline(preset("geo"), 1)
    theta = torch.tensor([0.3, -2.0, 3.0])
    _, labels = _only(pipeline, images(3, 1, 8), "rotate", theta=theta)
    assert torch.allclose(labels[:, 1], theta.cos() - 1) and torch.allclose(labels[:, 2], theta.sin())


def test_translation_is_draw_times_std_times_size_and_labelled_by_the_draw():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    pipeline = AugmentPipeline(preset("geo"), 1)  # translate_std 0.125: a draw of 1 shifts 2 px on 16 px
    out, labels = _only(pipeline, x, "translate", w=[[2.0, -1.0]])  # +4 px right, -2 px (up)
    expected = torch.zeros_like(x)
    expected[0, 0, 6, 12] = 1.0
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(labels[0, 5:], torch.tensor([2.0, -1.0]))  # the unit-free draw, as the reference
    # Reflection padding: what enters at the left border is the mirrored left edge.
    x[0, 0, 8, 8], x[0, 0, 8, 2] = 0.0, 1.0
    out, _ = _only(pipeline, x, "translate", w=[[2.0, 0.0]])
    assert out[0, 0, 8, 6] > 0.999 and out[0, 0, 8, 1] > 0.999  # column -3 reflects to column 2
    assert out.sum() < 2.001


def test_sampled_translation_labels_are_the_standard_normal_draws():
    # Mutation caught: labelling the shift in image units (draw × translate_std) gives std 0.125.
    pipeline = AugmentPipeline(preset("geo", translate_std=0.05), 1)
    params = pipeline.sample_params((4000, 1, 4, 4), 1.0, torch.Generator().manual_seed(0))
    _, labels = pipeline.apply(torch.zeros(4000, 1, 4, 4), params)
    columns = [pipeline.label_names.index("translate_x"), pipeline.label_names.index("translate_y")]
    assert torch.equal(labels[:, columns], params["translate"]["w"])
    assert abs(labels[:, columns].std().item() - 1.0) < 0.05


def test_anisotropic_angle_is_zero_in_half_of_the_applied_draws():
    pipeline = AugmentPipeline(preset("geo"), 1)
    x = torch.zeros(8000, 1, 4, 4)
    _, labels = pipeline(x, 0.5, torch.Generator().manual_seed(0))
    cos, sin = (labels[:, pipeline.label_names.index(n)] for n in ("aniso_cos", "aniso_sin"))
    applied = cos != 0                                  # w ~ N(0,1) is never exactly 0
    axis_aligned = (sin[applied] == 0).float().mean().item()
    assert abs(applied.float().mean().item() - 0.5) < 0.03
    assert abs(axis_aligned - 0.5) < 0.03               # binomial std ~0.008 over ~4000 draws
    assert torch.count_nonzero(sin[~applied]) == 0
    rotated = sin[applied] != 0                          # the others: r ~ U(-pi, pi), all quadrants
    ratio = sin[applied][rotated] / cos[applied][rotated]
    assert (ratio > 1).any() and (ratio < -1).any()
    for prob, expected in ((0.0, 1.0), (1.0, 0.0)):
        pipe = AugmentPipeline(preset("geo", aniso_rotate_prob=prob), 1)
        _, lab = pipe(x[:500], 1.0, torch.Generator().manual_seed(1))
        assert (lab[:, pipe.label_names.index("aniso_sin")] == 0).float().mean().item() == expected


def test_isotropic_scale_enlarges_about_the_centre():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 6:10, 6:10] = 1.0  # a 4x4 square in the middle
    pipeline = AugmentPipeline(preset("geo"), 1)  # scale_std 0.2: w = 5 -> scale 2
    out, labels = _only(pipeline, x, "scale", w=5.0)
    assert labels[0, 0] == 5.0
    assert torch.allclose(out[0, 0, 5:11, 5:11], torch.ones(6, 6), atol=1e-5)  # 8x8 square, inner 6x6 exact
    assert out[0, 0, :3].abs().max() < 1e-6


def test_hue_rotates_about_the_grey_axis():
    x = images(4, 3, 8)
    pipeline = AugmentPipeline(preset("geo_clr"), 3)
    # A third of a turn about (1,1,1) permutes the channels cyclically; grey stays grey.
    out, _ = _only(pipeline, x, "hue", theta=2 * math.pi / 3)
    assert torch.allclose(out, x[:, [2, 0, 1]], atol=1e-5)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    out, _ = _only(pipeline, grey, "hue", theta=1.0)
    assert torch.allclose(out, grey, atol=1e-5)


def test_saturation_zero_gives_grey_and_contrast_brightness_one_channel():
    x = images(2, 3, 8)
    pipeline = AugmentPipeline(preset("geo_clr"), 3)
    out, _ = _only(pipeline, x, "saturation", w=-200.0)  # 2^(-200) ~ 0
    assert torch.allclose(out, x.mean(1, keepdim=True).expand_as(x), atol=1e-5)
    mono = AugmentPipeline(preset("geo_clr"), 1)
    y = images(2, 1, 8)
    out, _ = _only(mono, y, "contrast", w=2.0)  # contrast_std 0.5 -> x 2
    assert torch.allclose(out, 2 * y)
    out, _ = _only(mono, y, "brightness", w=1.0)  # brightness_std 0.2
    assert torch.allclose(out, y + 0.2)


def test_degradations_blur_mixup_noise():
    x = images(4, 3, 16)
    pipeline = AugmentPipeline(preset("deg"), 3)
    blurred, labels = _only(pipeline, x, "blur", sigma=2.0)
    assert torch.allclose(labels[:, 0], torch.full((4,), 2.0))
    assert blurred.std() < 0.6 * x.std()  # white noise loses most of its variance
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.1)

    params = pipeline.sample_params(x.shape, 0.0)
    params["mixup"]["weight"] = torch.full((4,), 0.25)
    mixed, labels = pipeline.apply(x, params)
    partner = x[params["mixup"]["partner"]]
    assert (params["mixup"]["partner"] != torch.arange(4)).all()
    assert torch.allclose(mixed, 0.75 * x + 0.25 * partner, atol=1e-6)
    assert torch.allclose(labels[:, 1], torch.full((4,), 0.25))

    noisy, labels = _only(pipeline, x, "noise", magnitude=0.5)
    d = x[0].numel()
    assert torch.allclose((noisy - x).flatten(1).norm(dim=1), torch.full((4,), 0.5 * math.sqrt(d)), rtol=1e-4)


def test_sampled_strengths_follow_the_config():
    pipeline = AugmentPipeline(preset("geo_clr_deg", rot_max=0.25, blur_max=1.5, noise_std=0.1), 3)
    _, labels = pipeline(images(4000, 3, 4), 1.0, torch.Generator().manual_seed(0))
    names = pipeline.label_names
    rot_sin = labels[:, names.index("rotate_sin")]
    assert rot_sin.abs().max() <= math.sin(math.pi * 0.25) + 1e-6
    assert 0 <= labels[:, names.index("blur")].min() and labels[:, names.index("blur")].max() <= 1.5
    assert labels[:, names.index("noise")].max() <= 0.1
    assert abs(labels[:, names.index("translate_x")].std().item() - 1.0) < 0.05  # the N(0,1) draw
    mix = labels[:, names.index("mixup")]  # 0.5 * Beta(1, 3): mean 0.125
    assert mix.max() <= 0.5 and abs(mix.mean().item() - 0.125) < 0.01


@pytest.mark.parametrize("key, value, message", [
    ("p", 1.5, "augment.p: must be in [0, 1], got 1.5"),
    ("p", -0.1, "augment.p: must be in [0, 1], got -0.1"),
    ("rot_max", -1, "augment.rot_max: must be >= 0, got -1"),
    ("aniso_rotate_prob", 1.5, "augment.aniso_rotate_prob: must be in [0, 1], got 1.5"),
    ("scale_std", "big", "augment.scale_std: must be a number, got 'big'"),
    ("mixup_beta", 0, "augment.mixup_beta: must be > 0, got 0"),
    ("blur_kernel", 10, "augment.blur_kernel: must be an odd integer >= 1, got 10"),
    ("families", ["geo", "foo"], "augment.families: unknown family 'foo'; allowed: clr, deg, geo"),
])
def test_validation_names_the_field(key, value, message):
    cfg = preset("geo_clr_deg", **{key: value})
    with pytest.raises(ConfigError) as err:
        validate_augment(cfg)
    assert str(err.value) == message
    with pytest.raises(ConfigError):
        AugmentPipeline(cfg, 3)


def test_validation_requires_the_keys_of_enabled_families_only():
    cfg = OmegaConf.create({"name": "deg", "families": ["deg"], "p": 0.1,
                            "blur_max": 1.0, "blur_kernel": 5, "mixup_beta": 2.0, "noise_std": 0.1})
    validate_augment(cfg)
    assert AugmentPipeline(cfg, 1).num_labels == 3
    del cfg["noise_std"]
    with pytest.raises(ConfigError, match=r"^augment\.noise_std: missing"):
        validate_augment(cfg)
    for name in ["idt", "geo", "deg", "geo_deg", "geo_clr", "geo_clr_deg"]:
        validate_augment(preset(name))


def test_rotation_range_comes_from_the_dataset():
    from ayt.config import compose_config
    digits, cifar = compose_config(["dataset=digits"]), compose_config(["dataset=cifar10"])
    assert digits.augment.rot_max == digits.dataset.augment_rot_max < 0.5   # a rotated 6 must not pass for a 9
    assert cifar.augment.rot_max == 1.0                                     # the reference's full circle
    assert compose_config(["dataset=digits", "augment=geo", "augment.rot_max=0.3"]).augment.rot_max == 0.3
    pipeline = AugmentPipeline(digits.augment, 1)
    _, labels = pipeline(torch.zeros(2000, 1, 4, 4), 1.0, torch.Generator().manual_seed(0))
    angle = torch.atan2(labels[:, 2], labels[:, 1] + 1)
    assert angle.abs().max() <= math.pi * digits.dataset.augment_rot_max + 1e-5
    assert angle.abs().max() > 0.9 * math.pi * digits.dataset.augment_rot_max
