"""The evaluation sharded across Ray Train workers is the unsharded one: each of 2 CPU workers
samples its slice of the fixed noise set (31 samples: slices of 15 and 16), extracts its
features, the Fréchet sums are all-reduced in float64 and the features gathered for KID and
precision/recall; rank 0's metrics equal those of one process to ~1e-6 relative.

Mutations caught: a rank sampling the noise set from its start instead of its slice (the
2-worker images repeat, FID moves); the gathered features out of rank order or missing the
shorter rank's padding trim (KID and precision/recall move); a float32 all-reduce of Σxxᵀ
(FID off by more than 1e-6); only rank 0's features in the statistics (FID of 15 samples).
"""

from __future__ import annotations

import pytest
import torch

from ayt.bench.fid import NET_SEED, evaluate_on_workers
from ayt.config import load_config
from ayt.data import load_dataset
from ayt.eval.classifier import DigitClassifier, save_classifier
from ayt.eval.probe import EvalProbe, ensure_references
from ayt.networks.precond import build_denoiser


def test_two_workers_give_the_metrics_of_one(ray_session, tmp_path):
    cfg = load_config([f"out_dir={tmp_path}", "experiment=smoke", "fid.num_samples=31", "fid.batch_size=8",
                       "eval.feature_batch_size=6", "eval.metrics=[fid,kid,prc]", "eval.kid.subsets=5"])
    data = load_dataset(cfg.dataset, train=True)
    weights, cache = str(tmp_path / "classifier.pt"), str(tmp_path / "cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_classifier(DigitClassifier(data.channels, data.resolution, data.num_classes, width=8), weights)
        torch.manual_seed(NET_SEED)
        net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).eval()
    ensure_references(cfg, weights, cache, data, "cpu")
    one = EvalProbe(cfg, weights, cache, data, "cpu")(net)
    reported = evaluate_on_workers(cfg, weights, cache, 2, str(tmp_path / "ray"))
    two = reported["values"]
    assert reported["world_size"] == 2 and set(two) == set(one)
    for key in ("eval/fid_1step", "eval/fid_2step", "eval/kid_1step", "eval/kid_2step"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key
    for key in ("eval/precision_1step", "eval/recall_2step"):
        assert two[key] == one[key], key
