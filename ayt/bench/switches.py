"""`switches`: channels_last, precision=bf16 (and torch.compile with --compile) against the
default (fp32, contiguous, eager) on the CPU preset, MFD step."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ayt.bench import Options, benchmark
from ayt.bench.harness import ratio, resolve, summarize, synchronize, temp_dir, time_interleaved
from ayt.bench.presets import CPU_PRESET, Preset, build_step, preset_for, random_batch

SWITCH_BATCH = 32
HELPS = 1.05        # a switch "helps here" when it is at least this much faster than the default


@benchmark("switches")
def bench_switches(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    preset = replace(preset_for(CPU_PRESET, opts), batch=4 if opts.quick else SWITCH_BATCH)
    variants = {"default": [], "channels_last": ["channels_last=true"], "bf16": ["precision=bf16"]}
    results: dict[str, Any] = {}
    with temp_dir() as tmp:
        built = {name: build_step(preset, ov, device, tmp, opts.seed) for name, ov in variants.items()}
        inputs = {name: random_batch(preset, cfg, device, opts.seed) for name, (_, cfg) in built.items()}
        fns = {name: (lambda i, s=step, x=inputs[name]: s(x, i)) for name, (step, _) in built.items()}
        compile_info: dict[str, Any] = {"skipped": "torch.compile takes minutes to compile here; pass --compile"}
        if opts.compile:
            compile_info, fns["compile"] = compiled_step(preset, opts, device, tmp)
        times = time_interleaved(fns, opts.warmup, opts.repeats, device)
    stats = {name: summarize(t) for name, t in times.items()}
    for name, s in stats.items():
        results[name] = {**s, "speedup_vs_default": ratio(stats["default"], s)}
    if opts.compile:
        results["compile"].update(compile_info)
    else:
        results["compile"] = compile_info
    helps = {name: r["speedup_vs_default"] > HELPS for name, r in results.items()
             if name != "default" and "median_s" in r}
    return {
        "config": {"preset": preset.description, "batch_size": preset.batch, "loss": "mfd (the config default)",
                   "variants": {**{k: v or ["(config defaults)"] for k, v in variants.items()},
                                "compile": ["compile=true"]},
                   "helps": f"speedup_vs_default (default median / variant median) > {HELPS}",
                   "note": f"batch {preset.batch}, not 128: bf16 autocast is very slow on this CPU and would not fit "
                           "the time budget at 128"},
        "results": results,
        "helps_here": helps,
        "headline": ", ".join(f"{k} {r['speedup_vs_default']:.2f}x" for k, r in results.items()
                              if k != "default" and "speedup_vs_default" in r),
    }


def compiled_step(preset: Preset, opts: Options, device: torch.device, workdir: Path):
    """A compile=true step, compiled from a fresh inductor cache; the first call is timed apart.
    (The harness restores TORCHINDUCTOR_CACHE_DIR afterwards.)"""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor-cache")
    step, cfg = build_step(preset, ["compile=true"], device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    synchronize(device)
    start = time.perf_counter()
    step(x, 0)
    step(x, 1)      # a second call may recompile (guards on the first call's state)
    synchronize(device)
    first = time.perf_counter() - start
    return {"first_two_calls_s_including_compilation": first, "inductor_cache": "fresh (cold)"}, \
        (lambda i: step(x, i + 2))
