"""`fid`: one evaluation (the loop's `EvalProbe`: 1- and 2-step samples of the fixed noise set,
features, every configured metric) with and without cached reference statistics, its cost split
(generation, feature extraction, statistics and metrics), the same evaluation sharded over 1
and 2 Ray Train workers (ratio, same run), against the training time between two evaluations."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ayt.bench import Options, benchmark
from ayt.bench.harness import resolve, summarize, synchronize, temp_dir, time_interleaved
from ayt.bench.presets import CPU_PRESET, build_step, preset_for, random_batch
from ayt.config import compose_config
from ayt.data import load_dataset
from ayt.eval.classifier import DigitClassifier, save_classifier
from ayt.eval.probe import EvalProbe, ensure_references
from ayt.networks.precond import build_denoiser

PHASES = ("generation", "extraction", "statistics")
NET_SEED = 0                 # the random denoiser every worker builds alike


def probe_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: build the denoiser (seeded: every rank alike) and the probe on this
    rank's slice, run `repeats` evaluations after `warmup`, report rank 0's metrics and timings."""
    import ray.train
    import ray.train.torch
    context = ray.train.get_context()
    cfg = OmegaConf.create(config["cfg"])
    device = ray.train.torch.get_device()
    data = load_dataset(cfg.dataset, train=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NET_SEED)
        net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device).eval()
    probe = EvalProbe(cfg, config["weights"], config["cache"], data, device, context.get_world_rank(),
                      context.get_world_size())
    for _ in range(int(config.get("warmup", 0))):
        probe(net)
    timings, values = [], {}
    for _ in range(int(config.get("repeats", 1))):
        t0 = time.perf_counter()
        values = probe(net)
        timings.append({**probe.timings, "total": time.perf_counter() - t0})
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:      # Ray Train's Result holds the metrics of a checkpointed report
        (Path(tmp) / f"rank{context.get_world_rank()}.txt").write_text("probe")
        ray.train.report({"values": values, "timings": timings, "world_size": context.get_world_size()},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def evaluate_on_workers(cfg: DictConfig, weights: str, cache: str, workers: int, storage: str,
                        repeats: int = 1, warmup: int = 0) -> dict[str, Any]:
    """The probe on `workers` Ray Train CPU workers (one CPU each): rank 0's metrics and the
    timings of each evaluation. Needs a running Ray; the reference statistics already cached."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    trainer = TorchTrainer(
        probe_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "weights": weights, "cache": cache,
                           "repeats": repeats, "warmup": warmup},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"probe-{workers}w-{os.getpid()}-{time.monotonic_ns()}", storage_path=storage))
    return trainer.fit().metrics


@benchmark("fid")
def bench_fid(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    preset = preset_for(CPU_PRESET, opts)
    extra = ["fid.num_samples=40", "fid.batch_size=10", "eval.feature_batch_size=10"] if opts.quick else []
    cfg = compose_config([*preset.overrides, *extra])
    data = load_dataset(cfg.dataset, train=True)
    repeats = max(1, min(opts.repeats, 3))
    n = int(cfg.fid.num_samples)
    with temp_dir("ayt-bench-fid-") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            classifier = DigitClassifier(data.channels, data.resolution, data.num_classes,
                                         width=int(cfg.fid.classifier.width))
            torch.manual_seed(NET_SEED)
            net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device).eval()
        weights = str(tmp / "classifier.pt")
        save_classifier(classifier, weights)

        def evaluation(cache: str) -> dict[str, float]:
            """What the loop does at an eval boundary, in one process: EvalProbe, its references, one call."""
            synchronize(device)
            t0 = time.perf_counter()
            probe = EvalProbe(cfg, weights, cache, data, device)
            t1 = time.perf_counter()
            ensure_references(cfg, weights, cache, data, device)
            t2 = time.perf_counter()
            probe(net)
            synchronize(device)
            t3 = time.perf_counter()
            return {"setup": t1 - t0, "reference_stats": t2 - t1, **probe.timings, "total": t3 - t0}

        for i in range(opts.warmup):        # imports, torch-fidelity's first extractor build, allocator
            evaluation(str(tmp / f"fid-warmup-{i}"))
        uncached = [evaluation(str(tmp / f"fid-cold-{i}")) for i in range(repeats)]
        warm_cache = str(tmp / "fid-cold-0")
        cached = [evaluation(warm_cache) for _ in range(repeats)]
        sharded = workers_comparison(cfg, weights, warm_cache, tmp, repeats, opts.warmup)
        step_stats = default_step_time(opts, device, tmp)
    eval_every = int(cfg.training.eval_every)
    train_between = eval_every * step_stats["median_s"]
    cached_total = statistics.median(r["total"] for r in cached)
    uncached_total = statistics.median(r["total"] for r in uncached)
    split = {p: statistics.median(r[p] for r in cached) for p in PHASES}
    results = {
        "uncached": {k: summarize([r[k] for r in uncached]) for k in uncached[0]},
        "cached": {k: summarize([r[k] for r in cached]) for k in cached[0]},
        "cost_split": {p: split[p] / sum(split.values()) for p in PHASES},
        # Per image: generation per network pass (2 per sample), extraction per extracted image
        # (1- and 2-step samples), statistics per evaluation (it does not grow with the samples
        # that the all-reduce sums).
        "per_image_s": {"generation": split["generation"] / (2 * n), "extraction": split["extraction"] / (2 * n)},
        "statistics_s": split["statistics"],
        "workers": sharded,
        "training_step": step_stats,
        "eval_every": eval_every,
        "training_between_evaluations_s": train_between,
        "fid_over_training": cached_total / train_between,
        "fid_fraction_of_wall": cached_total / (cached_total + train_between),
        "fid_fraction_of_wall_uncached": uncached_total / (uncached_total + train_between),
        "reference_stats_cache_saves_s": uncached_total - cached_total,
    }
    ratio = sharded.get("ratio_2_over_1")
    return {
        "config": {"dataset": "digits 16x16 (the reference set: its train split)", "fid_extractor": "classifier "
                   "(random init: the cost does not depend on the weights)", "num_samples": n,
                   "fid_batch_size": int(cfg.fid.batch_size), "feature_batch_size": int(cfg.eval.feature_batch_size),
                   "metrics": list(cfg.eval.metrics), "network": preset.description,
                   "eval_every": eval_every, "batch_size": preset.batch, "loss": str(cfg.loss.name),
                   "evaluation": "ayt.eval.probe.EvalProbe: fixed noise set, 1-step samples and the 2-step sampler "
                                 "continuing from them (2N network passes), features once, every configured metric",
                   "uncached": "a fresh torch-fidelity cache: the reference statistics are computed",
                   "cached": "the reference statistics read from the cache",
                   "workers": "the same evaluation on 1 and on 2 Ray Train CPU workers (1 CPU each), each its slice "
                              "of the noise set, statistics all-reduced; rank 0's wall time per evaluation"},
        "results": results,
        "headline": f"one evaluation {cached_total:.1f} s cached ({uncached_total:.1f} s uncached; generation "
                    f"{100 * results['cost_split']['generation']:.0f}%, extraction "
                    f"{100 * results['cost_split']['extraction']:.0f}%, statistics "
                    f"{100 * results['cost_split']['statistics']:.0f}%) against {train_between:.0f} s of training "
                    f"between evaluations: {100 * results['fid_fraction_of_wall']:.1f}% of the wall time"
                    + (f"; 2 workers take {ratio:.2f}x the time of 1" if ratio else ""),
    }


def workers_comparison(cfg: DictConfig, weights: str, cache: str, tmp: Path, repeats: int,
                       warmup: int) -> dict[str, Any]:
    """The evaluation on 1 then 2 Ray Train workers in this run (a local Ray if none is up)."""
    import ray

    from ayt.bench.ray_overhead import _start_ray
    _, started = _start_ray()
    try:
        found = {}
        for workers in (1, 2):
            metrics = evaluate_on_workers(cfg, weights, cache, workers, str(tmp / "ray"), repeats, max(warmup, 1))
            runs = metrics["timings"]
            found[str(workers)] = {k: summarize([r[k] for r in runs]) for k in (*PHASES, "total")}
    finally:
        if started:
            ray.shutdown()
    one, two = found["1"]["total"]["median_s"], found["2"]["total"]["median_s"]
    return {**found, "ratio_2_over_1": two / one, "speedup_2_over_1": one / two}


def default_step_time(opts: Options, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Median step time of the default config's loss at the CPU preset."""
    preset = preset_for(CPU_PRESET, opts)
    step, cfg = build_step(preset, [], device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    times = time_interleaved({"step": lambda i: step(x, i)}, opts.warmup, max(1, min(opts.repeats, 3)), device)
    return {**summarize(times["step"]), "loss": str(cfg.loss.name)}
