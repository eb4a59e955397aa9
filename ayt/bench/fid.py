"""`fid`: one FID evaluation (1- and 2-step, the loop's `FIDProbe`) with and without cached
reference statistics, against the training time between two evaluations."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ayt.bench import Options, benchmark
from ayt.bench.harness import resolve, summarize, synchronize, temp_dir, time_interleaved
from ayt.bench.presets import CPU_PRESET, build_step, preset_for, random_batch
from ayt.config import compose_config
from ayt.data import load_dataset
from ayt.eval.classifier import DigitClassifier, save_classifier
from ayt.networks.precond import build_denoiser
from ayt.training.loop import FIDProbe
from ayt.training.prepare import Artifacts


@benchmark("fid")
def bench_fid(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    preset = preset_for(CPU_PRESET, opts)
    extra = ["fid.num_samples=20", "fid.batch_size=10"] if opts.quick else []
    cfg = compose_config([*preset.overrides, *extra])
    data = load_dataset(cfg.dataset, train=True)
    repeats = max(1, min(opts.repeats, 3))
    with temp_dir("ayt-bench-fid-") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            classifier = DigitClassifier(data.channels, data.resolution, data.num_classes,
                                         width=int(cfg.fid.classifier.width))
            net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device).eval()
        weights = str(tmp / "classifier.pt")
        save_classifier(classifier, weights)

        def evaluation(cache: str) -> dict[str, float]:
            """What the loop does at an eval boundary: FIDProbe (fixed noise), 1- and 2-step samples, 2 FIDs."""
            synchronize(device)
            t0 = time.perf_counter()
            probe = FIDProbe(cfg, Artifacts(fid_weights=weights, fid_cache=cache), data, device)
            t1 = time.perf_counter()
            reference = probe.evaluator.ensure_reference_stats()
            t2 = time.perf_counter()
            samples = probe.samples(net)
            synchronize(device)
            t3 = time.perf_counter()
            for images in samples.values():
                probe.evaluator.fid(images)
            t4 = time.perf_counter()
            assert os.path.isfile(reference)
            return {"setup": t1 - t0, "reference_stats": t2 - t1, "sampling": t3 - t2, "fid": t4 - t3, "total": t4 - t0}

        for i in range(opts.warmup):        # imports, torch-fidelity's first extractor build, allocator
            evaluation(str(tmp / f"fid-warmup-{i}"))
        uncached = [evaluation(str(tmp / f"fid-cold-{i}")) for i in range(repeats)]
        warm_cache = str(tmp / "fid-cold-0")
        cached = [evaluation(warm_cache) for _ in range(repeats)]
        step_stats = default_step_time(opts, device, tmp)
    eval_every = int(cfg.training.eval_every)
    train_between = eval_every * step_stats["median_s"]
    cached_total = statistics.median(r["total"] for r in cached)
    uncached_total = statistics.median(r["total"] for r in uncached)
    results = {
        "uncached": {k: summarize([r[k] for r in uncached]) for k in uncached[0]},
        "cached": {k: summarize([r[k] for r in cached]) for k in cached[0]},
        "training_step": step_stats,
        "eval_every": eval_every,
        "training_between_evaluations_s": train_between,
        "fid_over_training": cached_total / train_between,
        "fid_fraction_of_wall": cached_total / (cached_total + train_between),
        "fid_fraction_of_wall_uncached": uncached_total / (uncached_total + train_between),
        "reference_stats_cache_saves_s": uncached_total - cached_total,
    }
    return {
        "config": {"dataset": "digits 16x16 (the reference set: its train split)", "fid_extractor": "classifier "
                   "(random init: the cost does not depend on the weights)", "num_samples": int(cfg.fid.num_samples),
                   "fid_batch_size": int(cfg.fid.batch_size), "network": preset.description,
                   "eval_every": eval_every, "batch_size": preset.batch, "loss": str(cfg.loss.name),
                   "evaluation": "ayt.training.loop.FIDProbe: fixed noise set, 1-step and 2-step samples of the "
                                 "(EMA) denoiser, two torch-fidelity FIDs",
                   "uncached": "a fresh torch-fidelity cache: the reference statistics are computed",
                   "cached": "the reference statistics read from the cache"},
        "results": results,
        "headline": f"one FID evaluation {cached_total:.1f} s cached ({uncached_total:.1f} s uncached) against "
                    f"{train_between:.0f} s of training between evaluations: "
                    f"{100 * results['fid_fraction_of_wall']:.1f}% of the wall time",
    }


def default_step_time(opts: Options, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Median step time of the default config's loss at the CPU preset."""
    preset = preset_for(CPU_PRESET, opts)
    step, cfg = build_step(preset, [], device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    times = time_interleaved({"step": lambda i: step(x, i)}, opts.warmup, max(1, min(opts.repeats, 3)), device)
    return {**summarize(times["step"]), "loss": str(cfg.loss.name)}
