"""`mfd`: the optimised MFD of `ayt.method.losses` against the naive form of
`ayt.training.probes.naive_mfd_terms`: equal gradients w.r.t. the prediction, and the speed ratio."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ayt.bench import Options, benchmark
from ayt.bench.harness import ratio, resolve, round_ratios, summarize, target, temp_dir, time_interleaved
from ayt.bench.presets import CIFAR_PRESET, CPU_PRESET, Preset, preset_for, random_feature_map_file
from ayt.config import compose_config
from ayt.method.losses import ManifoldFeatureDistance
from ayt.networks.feature_map import load_feature_map
from ayt.training.probes import MFD_ATOL, MFD_RTOL, gradient_wrt_prediction, mfd_gradients, naive_mfd_terms

TARGET_MFD_SPEEDUP = 1.3           # optimised MFD >= 1.3x faster than the naive form


def mfd_pair(preset: Preset, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(optimised loss, naive feature map, pred, target) with the same weights and inputs."""
    cfg = compose_config(list(preset.overrides))
    with temp_dir() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        frozen = load_feature_map(random_feature_map_file(cfg, preset.resolution, preset.channels, tmp), device)
    naive_fm = copy.deepcopy(frozen).eval().requires_grad_(True)      # same weights, eval-mode BatchNorm
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (preset.batch, preset.channels, preset.resolution, preset.resolution)
    target_images = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    pred = (target_images + 0.3 * torch.randn(shape, generator=gen).to(device)).requires_grad_(True)
    return ManifoldFeatureDistance(frozen, eps=float(cfg.loss.get("eps", 1e-5))), naive_fm, pred, target_images


def check_gradients(preset: Preset, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """`mfd_gradients` of the two forms built by `mfd_pair` for `preset`."""
    return mfd_gradients(*mfd_pair(preset, device, seed))


@benchmark("mfd")
def bench_mfd(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    results: dict[str, Any] = {}
    for base in (CPU_PRESET, CIFAR_PRESET):
        preset = preset_for(base, opts)
        check = check_gradients(preset, device, opts.seed)
        if not check["allclose"]:
            raise AssertionError(f"naive and optimised MFD gradients differ at {base.name}: "
                                 f"max abs diff {check['max_abs_diff']:.3g}")
        optimised, naive_fm, pred, target_images = mfd_pair(preset, device, opts.seed)
        fns = {"optimised": lambda i: gradient_wrt_prediction(lambda p: optimised(p, target_images, i), pred),
               "naive": lambda i: gradient_wrt_prediction(
                   lambda p: naive_mfd_terms(naive_fm, p, target_images, optimised.eps), pred)}
        times = time_interleaved(fns, opts.warmup, opts.repeats, device)
        stats = {name: summarize(t) for name, t in times.items()}
        results[base.name] = {
            "batch_size": preset.batch, "image": [preset.channels, preset.resolution, preset.resolution],
            "feature_map_channels": list(optimised.feature_map.channels), **stats,
            "speedup": ratio(stats["naive"], stats["optimised"]),
            "speedup_per_round": round_ratios(times["naive"], times["optimised"]),
            "gradients_equal": check["allclose"], "max_abs_diff": check["max_abs_diff"],
            "max_rel_diff": check["max_rel_diff"]}
    speedup = results["cpu"]["speedup"]
    return {
        "config": {"timed": "loss terms from (prediction, target) plus the backward to the prediction; "
                            "the U-Net is not part of it",
                   "optimised": "ayt.method.losses.ManifoldFeatureDistance: frozen feature map, target features "
                                "under no_grad, torch.autograd.grad w.r.t. the prediction only",
                   "naive": "ayt.training.probes.naive_mfd_terms: feature-map parameters requiring grad, target "
                            "features with autograd recording, linalg.vector_norm, plain .backward() "
                            "(parameter grads too)",
                   "speedup": "naive median / optimised median",
                   "same_weights_and_inputs": True, "tolerance": {"rtol": MFD_RTOL, "atol": MFD_ATOL},
                   "presets": {"cpu": CPU_PRESET.description, "cifar_small": CIFAR_PRESET.description}},
        "results": results,
        "targets": {"optimised_mfd_speedup_cpu": target(speedup, ">=", TARGET_MFD_SPEEDUP)},
        "headline": f"optimised MFD {speedup:.2f}x faster than naive at the CPU preset "
                    f"({results['cifar_small']['speedup']:.2f}x at cifar_small); gradients equal",
    }
