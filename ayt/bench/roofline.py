"""`roofline`: the step's achieved FLOP/s (FLOPs counted by `ayt.training.probes.count_step_flops`)
against an fp32 matmul peak measured in the same process."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from ayt.bench import Options, benchmark
from ayt.bench.harness import resolve, summarize, temp_dir, time_interleaved
from ayt.bench.presets import CPU_PRESET, Preset, build_step, preset_for, random_batch
from ayt.training.probes import count_step_flops


def step_flops(preset: Preset, opts: Options, device: torch.device, workdir: Path) -> dict[str, int]:
    """FLOPs of one step at `preset`: the U-Net's forward + backward (a pseudo-Huber step) and
    the feature map's passes of the MFD loss."""
    step, cfg = build_step(preset, ["loss=pseudo_huber"], device, workdir, opts.seed)
    mfd_step, _ = build_step(preset, ["loss=mfd"], device, workdir, opts.seed)
    return count_step_flops(step, random_batch(preset, cfg, device, opts.seed), mfd_loss=mfd_step.loss)


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict[str, Any]:
    """Achieved FLOP/s of an n x n fp32 matmul (2 n^3 FLOPs), best and median over repeats."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    times = time_interleaved({"mm": lambda i: torch.mm(a, b)}, 1, repeats, device)["mm"]
    flops = 2 * n ** 3
    return {"n": n, "dtype": "float32", **summarize(times), "peak_gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9}


@benchmark("roofline")
def bench_roofline(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    preset = preset_for(CPU_PRESET, opts)
    results: dict[str, Any] = {}
    with temp_dir() as tmp:
        counted = step_flops(preset, opts, device, tmp)
        flops = {"pseudo_huber": {"unet_forward_backward": counted["unet_forward_backward"], "feature_map_mfd": 0},
                 "mfd": counted}
        for count in flops.values():
            count["total"] = count["unet_forward_backward"] + count["feature_map_mfd"]
        steps = {loss: build_step(preset, [f"loss={loss}"], device, tmp, opts.seed) for loss in flops}
        x = random_batch(preset, steps["mfd"][1], device, opts.seed)
        times = time_interleaved({loss: (lambda i, s=s: s(x, i)) for loss, (s, _) in steps.items()},
                                 opts.warmup, opts.repeats, device)
    peak = matmul_peak(device, 256 if opts.quick else 2048, max(2, opts.repeats))
    for loss, count in flops.items():
        s = summarize(times[loss])
        achieved = count["total"] / s["median_s"] / 1e9
        results[loss] = {"flops_per_step": count, "gflop_per_step": count["total"] / 1e9, **s,
                         "achieved_gflops": achieved, "fraction_of_matmul_peak": achieved / peak["peak_gflops"]}
    results["matmul_peak"] = peak
    return {
        "config": {"preset": preset.description, "batch_size": preset.batch,
                   "flops": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention FLOPs; elementwise, "
                            "norms, Adam and EMA count zero)",
                   "peak": "best of repeated fp32 torch.mm of two n x n matrices in this process"},
        "results": results,
        "headline": f"CPU preset step: {results['pseudo_huber']['achieved_gflops']:.1f} GFLOP/s pseudo-Huber, "
                    f"{results['mfd']['achieved_gflops']:.1f} GFLOP/s MFD, against a matmul peak of "
                    f"{peak['peak_gflops']:.1f} GFLOP/s "
                    f"({100 * results['mfd']['fraction_of_matmul_peak']:.0f}%)",
    }
