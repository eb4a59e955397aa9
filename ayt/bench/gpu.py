"""`gpu`: the paper-scale step on one CUDA GPU, one command, at most about 5 minutes.

For fp32 / tf32 / bf16 (`ayt.precision`) x compile off / on, at cifar10_paper's network
(DDPM++, 55.7M parameters, 32x32x3), loss (MFD through a VGG16-shaped feature map) and
batch 128 (halved until it fits), the real `ConsistencyStep` built by the loop's own
`build_training`: the time per step (median over `--repeats` after `--warmup`; a compiled
variant's first calls, compilation included, apart), images per second, achieved TFLOP/s and
MFU, and the peak memory the variant allocated; and the wall time of one evaluation of
10,000 samples (the loop's `EvalProbe`: 1- and 2-step samples, Inception features, FID)
under the preset's precision, measured before the compile variants.

FLOPs are counted on the CPU, once, with `torch.utils.flop_counter.FlopCounterMode` over one
step at a small batch (`ayt.bench.roofline.step_flops`: matmul, convolution and attention
FLOPs of the target pass, the prediction pass, its backward and the MFD feature map's
passes; elementwise ops, norms, Adam and EMA count zero), scaled to the batch: every counted
op is linear in the batch. MFU is achieved / peak, the peak of the variant's arithmetic (fp32:
the CUDA cores'; tf32: TF32 tensor cores; bf16: bf16 tensor cores, the mixed step counted
against it): the dense datasheet peak where the device's name is in `DATASHEET` (the source is
named in the record), else a peak measured here with an 8192^3 matmul in that arithmetic
(named as measured). Both are recorded when both exist.

Weights are random (scratch init, a random feature map and Inception): a step and an
evaluation cost the same whatever the weights. The FID's reference statistics are a random
stand-in (no dataset is read). Compile variants run while the time budget allows
(`BUDGET_S`; each is skipped with the reason otherwise), the preset's precision first.

It imports neither Ray, MLflow nor Optuna: it runs where only PyTorch and a few pure-Python
wheels are installed (README, "GPU benchmark"). Without CUDA it exits 2 with one line;
`--quick --device cpu` runs its whole code path on the CPU with a tiny network (a check of
the harness, no compile).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ayt.bench import Options, benchmark
from ayt.bench.harness import resolve, summarize, synchronize, temp_dir
from ayt.bench.presets import QUICK_NETWORK, Preset, build_step, random_batch
from ayt.bench.roofline import step_flops
from ayt.config import compose_config
from ayt.data import ImageData
from ayt.errors import ConfigError
from ayt.precision import PRECISIONS, apply_precision, preserved_backend_flags

BATCH = 128                       # ECT's and cifar10_paper's batch
FLOP_BATCH = 2                    # the batch the FLOPs are counted at (on the CPU), then scaled
FID_SAMPLES = 10_000
BUDGET_S = 270.0                  # a compile variant starts only if its estimated end is within this
                                  # (seconds since the benchmark started; the rest is measured first)
COMPILE_ESTIMATE_S = 90.0         # first compile's estimate (later ones: the measured first)
MATMUL_N = 8192
NATIVE = (8, 0)                   # compute capability with TF32 and bf16 tensor cores (Ampere)

PRESET = Preset("cifar10_paper", 32, 3, BATCH, ("experiment=cifar10_paper",),
                "cifar10_paper: DDPM++ (model_channels 128, channel_mult [2,2,2], num_blocks 4, attention at 16, "
                "resample blocks, dropout 0.2; 55.7M parameters) on 32x32x3 random images, loss mfd through a "
                "random VGG16-shaped feature map, RAdam, EMA")
QUICK = replace(PRESET, name="quick", batch=4, overrides=PRESET.overrides + QUICK_NETWORK,
                description="quick (tiny) version of: " + PRESET.description)

# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's datasheets, by a pattern of the name torch
# reports; first match wins. fp32: CUDA cores; tf32 and bf16: tensor cores. The A10G (AWS) has
# no published datasheet: it, and any GPU not listed, is measured.
DATASHEET: list[tuple[str, str, dict[str, float]]] = [
    (r"H200 NVL", "H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"H200", "H200 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    (r"H100 NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"H100 PCIe", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    (r"H100", "H100 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    (r"A100", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    (r"L40S", "L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
]


def datasheet_peak(device_name: str) -> tuple[str, dict[str, float]] | None:
    """(datasheet entry, {precision: dense TFLOP/s}) for a device name torch reports, or None."""
    for pattern, entry, peaks in DATASHEET:
        if re.search(pattern, device_name):
            return entry, peaks
    return None


def utilisation(flops_per_step: float, seconds_per_step: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s of a step and its MFU against `peak_tflops` (None: no MFU)."""
    achieved = flops_per_step / seconds_per_step / 1e12
    return {"achieved_tflops": achieved, "mfu": achieved / peak_tflops if peak_tflops else None}


def measured_peak(device: torch.device, precision: str, n: int, repeats: int = 5) -> float:
    """TFLOP/s of the best of `repeats` n x n matmuls in `precision`'s arithmetic (2 n^3 FLOPs each)."""
    dtype = PRECISIONS[precision].autocast_dtype or torch.float32
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    with preserved_backend_flags():
        apply_precision(precision)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e12


def require_cuda(device: torch.device, quick: bool) -> None:
    if device.type != "cuda" and not quick:
        raise ConfigError("device", f"{device.type}: the gpu benchmark needs a CUDA GPU and torch "
                          f"{torch.__version__} sees none (torch.cuda.is_available() is "
                          f"{torch.cuda.is_available()}); run it where one is (README, 'GPU benchmark'), "
                          "or pass --quick --device cpu to check its code path on the CPU")


@benchmark("gpu")
def bench_gpu(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    require_cuda(device, opts.quick)
    started = time.perf_counter()
    preset = QUICK if opts.quick else PRESET
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    precisions = [p for p in PRECISIONS if p == "fp32" or capability is None or capability >= NATIVE]
    sheet = datasheet_peak(name)
    with temp_dir("ayt-bench-gpu-") as tmp:
        flops = count_flops(preset, opts, tmp)
        n = 256 if opts.quick else MATMUL_N
        measured = {p: measured_peak(device, p, n) for p in precisions}
        variants: dict[str, Any] = {}
        for p in precisions:
            variants[f"{p}"] = run_variant(preset, p, False, opts, device, tmp, flops, sheet, measured)
        fid = time_evaluation(opts, device, tmp)          # before the compile variants: the budget counts it
        first_compiled = preset_precision()
        order = sorted(precisions, key=lambda p: p != first_compiled)
        compile_estimate = COMPILE_ESTIMATE_S
        for p in order:
            key = f"{p}+compile"
            if opts.quick and device.type != "cuda":
                variants[key] = {"skipped": "--quick on the CPU: Inductor would compile for minutes"}
                continue
            if time.perf_counter() - started + compile_estimate > BUDGET_S:
                variants[key] = {"skipped": f"time budget: {BUDGET_S:.0f} s would be exceeded "
                                            f"(compile estimate {compile_estimate:.0f} s)"}
                continue
            variants[key] = run_variant(preset, p, True, opts, device, tmp, flops, sheet, measured)
            compile_estimate = variants[key].get("first_calls_s", compile_estimate)
    best = min((v for v in variants.values() if "median_s" in v), key=lambda v: v["median_s"])
    return {
        "config": {"preset": preset.description, "device_name": name,
                   "compute_capability": list(capability) if capability else None,
                   "precisions": precisions, "requested_batch": preset.batch,
                   "flops": f"FlopCounterMode on the CPU over one step at batch {FLOP_BATCH if not opts.quick else 2}, "
                            "scaled to the batch (matmul/conv/attention FLOPs; elementwise, norms, Adam, EMA count 0)",
                   "peak": (f"datasheet: NVIDIA {sheet[0]} dense TFLOP/s {sheet[1]}" if sheet else
                            f"measured: best of 5 {n}^3 matmuls per precision on this device"),
                   "mfu": "achieved TFLOP/s / the peak of the variant's arithmetic (bf16: the bf16 tensor-core peak)",
                   "weights": "random (scratch init, random feature map and Inception): the cost does not depend on them",
                   "budget_s": BUDGET_S, "quick": opts.quick, "timed": "ConsistencyStep calls (noise, pairs, target "
                   "and prediction passes, MFD loss, backward, RAdam, EMA), each after synchronize"},
        "flops": flops,
        "peaks_tflops": {"datasheet": sheet[1] if sheet else None, "datasheet_entry": sheet[0] if sheet else None,
                         "measured": measured},
        "results": variants,
        "fid_evaluation": fid,
        "headline": (f"{name}: best {best['variant']} {best['median_s'] * 1e3:.0f} ms/step at batch "
                     f"{best['batch_size']} ({best['images_per_s']:.0f} img/s, MFU "
                     + (f"{100 * best['mfu']:.0f}%" if best.get("mfu") is not None else "n/a")
                     + f"); FID of {fid['num_samples']} samples {fid['total_s']:.1f} s"),
    }


def preset_precision() -> str:
    return str(compose_config(["experiment=cifar10_paper"]).precision)


def count_flops(preset: Preset, opts: Options, workdir: Path) -> dict[str, Any]:
    """FLOPs of one step at `preset.batch`, counted on the CPU at FLOP_BATCH and scaled."""
    small = replace(preset, batch=FLOP_BATCH)
    with preserved_backend_flags(), torch.random.fork_rng(devices=[]):
        apply_precision("fp32")
        counted = step_flops(small, opts, torch.device("cpu"), workdir)
    per_image = {k: v / FLOP_BATCH for k, v in counted.items()}
    per_image["total"] = per_image["unet_forward_backward"] + per_image["feature_map_mfd"]
    return {"per_image": per_image, "counted_at_batch": FLOP_BATCH, "counted": counted}


def run_variant(preset: Preset, precision: str, compiled: bool, opts: Options, device: torch.device,
                workdir: Path, flops: dict[str, Any], sheet, measured: dict[str, float]) -> dict[str, Any]:
    """Time one variant at the preset's batch, halving it until a step fits."""
    name = precision + ("+compile" if compiled else "")
    batch = preset.batch
    while True:
        try:
            return _time_variant(replace(preset, batch=batch), precision, compiled, opts, device, workdir,
                                 flops, sheet, measured, name)
        except torch.cuda.OutOfMemoryError:
            _free(device)
            if batch == 1:
                return {"variant": name, "skipped": "out of memory at batch 1"}
            batch //= 2


def _time_variant(preset: Preset, precision: str, compiled: bool, opts: Options, device: torch.device,
                  workdir: Path, flops: dict[str, Any], sheet, measured: dict[str, float], name: str) -> dict[str, Any]:
    step = None
    try:
        with preserved_backend_flags():
            apply_precision(precision)           # what configure_torch does in a training process
            step, cfg = build_step(preset, [f"precision={precision}", f"compile={str(compiled).lower()}"],
                                   device, workdir, opts.seed)
            x = random_batch(preset, cfg, device, opts.seed)
            first = _timed(lambda: [step(x, i) for i in range(max(1, opts.warmup))], device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [_timed(lambda i=i: step(x, opts.warmup + i), device) for i in range(opts.repeats)]
            peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        del step
        _free(device)
    stats = summarize(times)
    flops_per_step = flops["per_image"]["total"] * preset.batch
    result = {"variant": name, "batch_size": preset.batch, **stats,
              "images_per_s": preset.batch / stats["median_s"], "flops_per_step": flops_per_step,
              "peak_memory_gib": peak_memory, "first_calls_s": first, "first_calls": max(1, opts.warmup)}
    peak = sheet[1].get(precision) if sheet else None
    result.update(utilisation(flops_per_step, stats["median_s"], peak))
    result["mfu_vs_measured"] = utilisation(flops_per_step, stats["median_s"], measured.get(precision))["mfu"]
    result["peak_source"] = f"datasheet {sheet[0]}" if peak else "measured matmul"
    if result["mfu"] is None:
        result["mfu"] = result["mfu_vs_measured"]
    return result


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_evaluation(opts: Options, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Wall time of one evaluation of FID_SAMPLES samples (after a small warm-up evaluation on a GPU),
    the loop's `EvalProbe` under the preset's precision, random Inception and reference statistics."""
    from ayt.eval.fid import write_random_inception_weights
    from ayt.eval.probe import EvalProbe, ensure_references
    from ayt.networks.precond import build_denoiser
    samples = 20 if opts.quick else FID_SAMPLES
    weights = write_random_inception_weights(str(workdir / "inception.pth"))
    stats = workdir / "reference.npz"
    np.savez(stats, mu=np.zeros(2048, dtype=np.float32), sigma=np.eye(2048))
    precision = preset_precision()
    overrides = ["experiment=cifar10_paper", "training.init=scratch", f"fid.inception_weights={weights}",
                 f"fid.reference_stats={stats}", "fid.batch_size=1000", *(QUICK_NETWORK if opts.quick else [])]
    gen = torch.Generator().manual_seed(opts.seed)
    data = ImageData(torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1, torch.zeros(8, dtype=torch.long), 10,
                     "cifar10-stand-in")
    cache = str(workdir / "fid-cache")
    with preserved_backend_flags(), torch.random.fork_rng(devices=[]):
        apply_precision(precision)
        torch.manual_seed(opts.seed)
        cfg = compose_config(overrides + [f"fid.num_samples={samples}"])
        net = build_denoiser(cfg.network, cfg.edm, 32, 3).to(device).eval()
        ensure_references(cfg, weights, cache, data, device)
        if device.type == "cuda":                                  # kernels, autotuning, extractor
            warm = compose_config(overrides + [f"fid.num_samples={min(samples, 1000)}"])
            EvalProbe(warm, weights, cache, data, device)(net)
        probe = EvalProbe(cfg, weights, cache, data, device)
        total = _timed(lambda: probe(net), device)
    return {"num_samples": samples, "total_s": total, "phases_s": dict(probe.timings), "precision": precision,
            "evaluation": "ayt.eval.probe.EvalProbe: 1- and 2-step samples of the fixed noise set (2 network passes "
                          "per sample), Inception features, FID of each against the reference statistics",
            "fid_batch_size": int(cfg.fid.batch_size), "feature_batch_size": int(cfg.eval.feature_batch_size)}

