"""`step`: the real `ConsistencyStep` for each loss at the CPU preset and at a CIFAR-sized
preset, interleaved; ratios to pseudo-Huber; a scan of the step for host-device syncs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ayt.bench import Options, benchmark
from ayt.bench.harness import ratio, resolve, round_ratios, summarize, target, temp_dir, time_interleaved
from ayt.bench.presets import (CIFAR_PRESET, CPU_PRESET, Preset, build_step, count_parameters, loss_overrides,
                               lpips_skip_reason, preset_for, random_batch)
from ayt.training.probes import scan_host_syncs

TARGET_MFD_STEP_RATIO = 1.5        # MFD step <= 1.5x the pseudo-Huber step at the CPU preset
LOSSES = ["pseudo_huber", "l2", "l1", "mfd", "lpips"]


def time_losses(preset: Preset, losses: list[str], opts: Options, device: torch.device,
                workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-loss step timings at one preset (interleaved), plus what was built."""
    steps, skipped, cfg = {}, {}, None
    for loss in losses:
        reason = lpips_skip_reason(opts) if loss == "lpips" else None
        if reason:
            skipped[loss] = {"skipped": reason}
            continue
        steps[loss], cfg = build_step(preset, loss_overrides(loss, opts), device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    times = time_interleaved({name: (lambda i, s=s: s(x, i)) for name, s in steps.items()},
                             opts.warmup, opts.repeats, device)
    stats = {name: summarize(t) for name, t in times.items()}
    base = "pseudo_huber"
    result = {
        "preset": preset.description, "batch_size": preset.batch,
        "image": [preset.channels, preset.resolution, preset.resolution],
        "unet_parameters": count_parameters(next(iter(steps.values()))),
        "losses": {**stats, **skipped},
        "ratio_to_pseudo_huber": {name: ratio(stats[name], stats[base]) for name in stats},
        "ratio_to_pseudo_huber_per_round": {name: round_ratios(times[name], times[base]) for name in stats},
        "images_per_s": {name: preset.batch / s["median_s"] for name, s in stats.items()},
    }
    return result, steps


@benchmark("step")
def bench_step(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    results: dict[str, Any] = {}
    with temp_dir() as tmp:
        for preset in (CPU_PRESET, CIFAR_PRESET):
            p = preset_for(preset, opts)
            results[preset.name], steps = time_losses(p, LOSSES, opts, device, tmp)
            if preset is CPU_PRESET:
                x = random_batch(p, SimpleNamespace(channels_last=False), device, opts.seed)
                results["host_syncs"] = {name: scan_host_syncs(steps[name], x, 10_000)
                                         for name in ("pseudo_huber", "mfd")}
            del steps
    mfd_ratio = results["cpu"]["ratio_to_pseudo_huber"]["mfd"]
    return {
        "config": {"losses": LOSSES, "presets": {"cpu": CPU_PRESET.description,
                                                 "cifar_small": CIFAR_PRESET.description},
                   "built_by": "ayt.training.loop.build_training (scratch init, random feature map)",
                   "timed": "one ConsistencyStep call: noise, pairs, target and prediction passes, loss, "
                            "backward, Adam, EMA", "quick": opts.quick},
        "results": results,
        "targets": {"mfd_step_over_pseudo_huber_cpu": target(mfd_ratio, "<=", TARGET_MFD_STEP_RATIO)},
        "headline": f"CPU preset: MFD step {mfd_ratio:.2f}x pseudo-Huber "
                    f"({results['cpu']['losses']['mfd']['median_s'] * 1e3:.0f} ms vs "
                    f"{results['cpu']['losses']['pseudo_huber']['median_s'] * 1e3:.0f} ms)",
    }
