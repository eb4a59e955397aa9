"""The FID classifier and FID through torch-fidelity (classifier and Inception extractors)."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ayt.data import ImageData, load_dataset
from ayt.errors import ConfigError
from ayt.eval.classifier import DigitClassifier, load_classifier, save_classifier, train_classifier
from ayt.eval.fid import (
    CLASSIFIER_EXTRACTOR,
    ClassifierFeatureExtractor,
    FIDEvaluator,
    to_uint8_rgb,
    write_random_inception_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A small budget: the conf default (1500 iterations, width 32) is for real runs.
FAST_CLASSIFIER = OmegaConf.create({"iterations": 200, "batch_size": 64, "lr": 3e-3, "width": 16})


@pytest.fixture(scope="module")
def digits():
    cfg = {"name": "digits", "root": None, "resolution": 16}
    return load_dataset(cfg, train=True), load_dataset(cfg, train=False)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    train, test = digits
    model, acc = train_classifier(train, test, FAST_CLASSIFIER, seed=0, device="cpu", progress=False)
    path = str(tmp_path_factory.mktemp("classifier") / "classifier.pt")
    save_classifier(model, path)
    return model, acc, path


def test_classifier_reaches_high_test_accuracy(trained):
    _, acc, _ = trained
    assert acc > 0.9


def test_classifier_file_round_trip_weights_only(trained, digits):
    model, _, path = trained
    blob = torch.load(path, weights_only=True)  # plain tensors + ints: no pickled classes
    assert blob["kwargs"]["in_channels"] == 1 and blob["kwargs"]["resolution"] == 16
    again = load_classifier(path)
    x = digits[1].images[:8]
    assert torch.equal(again(x), model(x))
    assert model.features(x).shape == (8, model.kwargs["feature_dim"])


def test_classifier_training_is_deterministic(digits):
    train, test = digits
    tiny = OmegaConf.create({"iterations": 3, "batch_size": 16, "lr": 1e-3, "width": 8})
    a, _ = train_classifier(train, test, tiny, seed=1, device="cpu", progress=False)
    b, _ = train_classifier(train, test, tiny, seed=1, device="cpu", progress=False)
    c, _ = train_classifier(train, test, tiny, seed=2, device="cpu", progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_extractor_undoes_the_uint8_rgb_conversion(trained, digits):
    """torch-fidelity's uint8 RGB input gives the same embedding as the float grey images."""
    model, _, path = trained
    ext = ClassifierFeatureExtractor(CLASSIFIER_EXTRACTOR, ["embedding"], feature_extractor_weights_path=path)
    x = digits[1].images[:16]
    u8 = to_uint8_rgb(x)
    assert u8.dtype == torch.uint8 and u8.shape == (16, 3, 16, 16)
    (emb,) = ext(u8)
    quantized = u8[:, :1].float() / 127.5 - 1  # what survives the uint8 round trip
    assert torch.allclose(quantized, x, atol=0.5 / 127.5 + 1e-6)
    assert torch.allclose(emb, model.features(quantized), atol=1e-5)


def test_fid_classifier_small_for_real_large_for_noise_and_cached(trained, digits, tmp_path):
    _, _, path = trained
    train, test = digits
    cache = tmp_path / "fid_cache"
    ev = FIDEvaluator(train, "classifier", path, str(cache), torch.device("cpu"))
    stats = ev.ensure_reference_stats()
    assert os.path.isfile(stats) and stats == ev.reference_stats_path
    assert os.listdir(cache) == [os.path.basename(stats)]  # the raw-features cache is dropped
    mtime = os.stat(stats).st_mtime_ns

    fid_test = ev.fid(test.images)
    noise = torch.rand(len(test), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_noise = ev.fid(noise)
    assert math.isfinite(fid_test) and 0 < fid_test < 0.1 * fid_noise
    assert abs(ev.fid(train.images)) < 1e-3  # the reference itself

    # Reused, not recomputed: the file is untouched, and a second evaluator on the same
    # (weights, images) finds it.
    ev.ensure_reference_stats()
    again = FIDEvaluator(train, "classifier", path, str(cache), torch.device("cpu"))
    assert again.reference_stats_path == stats
    assert again.fid(test.images) == pytest.approx(fid_test, rel=1e-6)
    assert os.stat(stats).st_mtime_ns == mtime

    # The cached file is what FID reads: swap in the statistics of the noise set and the
    # noise becomes the "reference" (FID ~ 0) while the real digits move far away.
    noise_ev = FIDEvaluator(ImageData(noise, test.labels, 10, "noise"), "classifier", path, str(cache), "cpu")
    shutil.copyfile(noise_ev.ensure_reference_stats(), stats)
    assert abs(again.fid(noise)) < 1e-3
    assert again.fid(test.images) > 10 * fid_test


def test_cache_name_depends_on_weights_and_images(trained, digits, tmp_path):
    model, _, path = trained
    train, test = digits
    other = str(tmp_path / "other.pt")
    perturbed = DigitClassifier(**model.kwargs)
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        perturbed.head.bias.add_(1.0)
    save_classifier(perturbed, other)
    base = FIDEvaluator(train, "classifier", path, str(tmp_path), "cpu").reference_cache_name
    assert FIDEvaluator(train, "classifier", other, str(tmp_path), "cpu").reference_cache_name != base
    assert FIDEvaluator(test, "classifier", path, str(tmp_path), "cpu").reference_cache_name != base
    assert FIDEvaluator(train, "classifier", path, str(tmp_path / "x"), "cpu").reference_cache_name == base


def test_fid_evaluator_config_errors(digits, tmp_path, monkeypatch):
    train, _ = digits
    with pytest.raises(ConfigError) as err:
        FIDEvaluator(train, "resnet", None, str(tmp_path), "cpu")
    assert err.value.field == "dataset.fid_extractor" and "classifier, inception" in str(err.value)
    with pytest.raises(ConfigError, match="dataset.fid_extractor"):
        FIDEvaluator(train, "classifier", None, str(tmp_path), "cpu")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no hub-cached weights
    with pytest.raises(ConfigError) as err:
        FIDEvaluator(train, "inception", None, str(tmp_path), "cpu")
    assert err.value.field == "fid.inception_weights"
    with pytest.raises(ConfigError, match="fid.inception_weights"):
        FIDEvaluator(train, "inception", str(tmp_path / "missing.pt"), str(tmp_path), "cpu")


def test_inception_path_with_random_weights(digits, tmp_path):
    """torch-fidelity's own InceptionV3 (299x299, 2048-d pool features) loads our file and runs.

    (FID(reference, reference) ~ 0 is checked with the classifier extractor above.)

    Inception costs ~0.25 s per image on one CPU core, so a few images per set: enough for a
    finite FID (the covariances are low-rank, which torch-fidelity's formula handles).
    """
    _, test = digits
    weights = write_random_inception_weights(str(tmp_path / "inception.pt"))
    ref = ImageData(test.images[:5], test.labels[:5], 10, "digits")
    ev = FIDEvaluator(ref, "inception", weights, str(tmp_path / "cache"), "cpu", batch_size=5)
    stats = torch.load(ev.ensure_reference_stats(), weights_only=False)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert np.isfinite(stats["sigma"]).all() and np.abs(stats["mu"]).max() > 0
    fid = ev.fid(test.images[5:10])  # one FID only: its 2048x2048 eigensolve takes seconds
    assert math.isfinite(fid) and fid > 0
