"""`python -m ayt.bench [which ...] [--out FILE]`: timing benchmarks of the trainer.

Each benchmark prints one JSON object (one line): the machine (CPU count, load average
before and after), torch (version, threads), the configuration it measured, and for every
timed quantity the median and spread (IQR, min, max) over the repeats. `which` is any of

  step       the real `ConsistencyStep` (built by `ayt.training.loop.build_training`) for
             each loss, at the CPU preset and at a CIFAR-sized preset; ratios to pseudo-Huber
             measured in the same process; a scan of the step for host-device syncs
  switches   channels_last, precision=bf16 (and torch.compile with --compile) on the CPU preset
  mfd        the optimised MFD of `ayt.method.losses` against a naive form: equal gradients
             w.r.t. the prediction, and the speed ratio
  ray        the same small trial through Ray Train (1 worker) and through the plain loop
  fid        one FID evaluation (1- and 2-step) against the training time between two of them
  roofline   the step's achieved FLOP/s against a matmul peak measured in the same process
  all        every one of the above

Timing: warm-up calls first, then `--repeats` timed calls; when several variants are
compared they run interleaved (round-robin), so a change of machine load hits all of them
alike. Networks and the feature map are randomly initialised: a step costs the same
whatever the weights. Results of a run are committed under studies/benchmarks/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

BENCHMARKS: dict[str, Callable[["Options"], dict[str, Any]]] = {}
ALL = ("step", "switches", "mfd", "ray", "fid", "roofline")

# Targets from the benchmarks issue (#6); each record says whether it met them.
TARGET_MFD_STEP_RATIO = 1.5        # MFD step <= 1.5x the pseudo-Huber step at the CPU preset
TARGET_MFD_SPEEDUP = 1.3           # optimised MFD >= 1.3x faster than the naive form
TARGET_RAY_OVERHEAD = 0.10         # Ray Train (1 worker) per-step time <= 1.10x the plain loop

# Gradient equality of the two MFD forms, on unit-norm per-sample directions (float32).
MFD_RTOL, MFD_ATOL = 1e-4, 1e-6


def benchmark(name: str):
    def wrap(fn):
        BENCHMARKS[name] = fn
        return fn
    return wrap


@dataclass
class Options:
    """What every benchmark reads; the CLI flags of the same names set them."""

    repeats: int = 5                 # timed calls per variant
    warmup: int = 1                  # untimed calls per variant first
    threads: int | None = None       # torch intra-op threads (None: torch's default)
    device: str = "auto"             # auto | cpu | cuda | mps
    quick: bool = False              # tiny networks and batches (tests, a dry run of the harness)
    compile: bool = False            # switches: also measure torch.compile (minutes of compilation)
    lpips_weights: tuple[str, str] | None = None   # (vgg16.pth, lpips vgg.pth): time the LPIPS loss
    ray_iterations: int = 150        # ray: optimizer steps of the small trial
    ray_threads: int = 1             # ray: cpu_threads of the trial, both paths (a Ray worker reserves 1 CPU)
    seed: int = 0


# ---------------------------------------------------------------------------------------
# Machine, timing and statistics


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    return info


def torch_info(device: torch.device) -> dict[str, Any]:
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "device": str(device),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (the timer must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def summarize(times: list[float]) -> dict[str, Any]:
    """Median and spread of repeated timings, in seconds."""
    ordered = sorted(times)
    q1, q3 = (_quantile(ordered, 0.25), _quantile(ordered, 0.75))
    return {"median_s": statistics.median(ordered), "iqr_s": q3 - q1, "min_s": ordered[0], "max_s": ordered[-1],
            "repeats": len(ordered), "times_s": [round(t, 6) for t in times]}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default)."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_interleaved(fns: dict[str, Callable[[int], Any]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Call every fn(i) `warmup` times untimed, then `repeats` timed rounds, round-robin.

    `i` is the round index, the same for every variant of a round (a step's iteration:
    every loss sees the same noise draw).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn(i)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return a["median_s"] / b["median_s"]


def round_ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Spread of the per-round ratio a/b (both measured in the same round)."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ---------------------------------------------------------------------------------------
# Presets and the step, built the way the training loop builds it


@dataclass(frozen=True)
class Preset:
    """A network + image size + batch; `overrides` are Hydra overrides of conf/config.yaml."""

    name: str
    resolution: int
    channels: int
    batch: int
    overrides: tuple[str, ...]
    description: str


CPU_PRESET = Preset(
    "cpu", 16, 1, 128, ("network=cpu", "dataset=digits"),
    "conf/network/cpu.yaml (model_channels 32, channel_mult [1,2,2], num_blocks 2, attention at 8, dropout 0.2) "
    "on digits-sized 16x16x1 random images, batch_size 128 (the config default); feature map "
    "channels [32,64,128,128] (config default, 4 stages at 16x16)")
CIFAR_PRESET = Preset(
    "cifar_small", 32, 3, 32,
    ("dataset=cifar10", "network=cifar10", "network.model_channels=32", "network.num_blocks=2"),
    "the CIFAR-10 DDPM++ layout of conf/network/cifar10.yaml (channel_mult [2,2,2], attention at 16, "
    "dropout 0.2) at a quarter of the width (model_channels 32, not 128) and half the depth (num_blocks 2, "
    "not 4), about 1.9M parameters instead of 56M, on 32x32x3 random images, batch_size 32; feature map "
    "channels [32,64,128,128,128] (config default, 5 stages at 32x32)")
QUICK_NETWORK = ("network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
                 "network.attn_resolutions=[]", "feature_map.channels=[4,4,4,4,4]")


def preset_for(preset: Preset, opts: Options) -> Preset:
    """The preset itself, or a tiny network and batch of the same image size (--quick)."""
    if not opts.quick:
        return preset
    return replace(preset, batch=4, overrides=preset.overrides + QUICK_NETWORK,
                   description=f"quick (tiny) version of: {preset.description}")


def resolve(device: str) -> torch.device:
    from ayt.training.prepare import resolve_device
    return resolve_device(device)


def random_feature_map_file(cfg, resolution: int, channels: int, directory: Path) -> str:
    """A randomly initialised feature map, saved the way `ensure_feature_map` saves a trained one."""
    from ayt.method.augment import AugmentPipeline
    from ayt.networks.feature_map import FeatureMap
    from ayt.training.prepare import fm_kwargs
    num_labels = AugmentPipeline(cfg.augment, channels).num_labels
    fm = FeatureMap(channels, resolution, list(cfg.feature_map.channels), num_labels,
                    int(cfg.feature_map.convs_per_stage))
    path = directory / f"feature_map_{resolution}x{channels}_{'-'.join(map(str, fm.channels))}.pt"
    torch.save({"kwargs": fm_kwargs(fm), "state_dict": fm.state_dict()}, path)
    return str(path)


def build_step(preset: Preset, overrides: Iterable[str], device: torch.device, workdir: Path, seed: int = 0):
    """(ConsistencyStep, cfg) for `preset` + overrides, through the loop's own `build_training`
    (scratch init: random weights; a random feature map where the loss needs one)."""
    from ayt.config import compose_config
    from ayt.training.loop import WorkerContext, build_training
    from ayt.training.prepare import Artifacts, needs_feature_map
    cfg = compose_config([*preset.overrides, *overrides, f"batch_size={preset.batch}", "training.init=scratch",
                          f"seed={seed}"])
    artifacts = Artifacts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if needs_feature_map(cfg):
            artifacts.feature_map = random_feature_map_file(cfg, preset.resolution, preset.channels, workdir)
        torch.manual_seed(seed)     # every variant starts from the same U-Net weights
        step = build_training(cfg, artifacts, WorkerContext(device),
                              SimpleNamespace(resolution=preset.resolution, channels=preset.channels))
    return step, cfg


def random_batch(preset: Preset, cfg, device: torch.device, seed: int = 0) -> Tensor:
    """Images in [-1, 1], in the memory format the loop would hand the step."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(preset.batch, preset.channels, preset.resolution, preset.resolution, generator=gen) * 2 - 1)
    x = x.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def count_parameters(step) -> int:
    from ayt.training.step import unwrap
    return sum(p.numel() for p in unwrap(step.net).parameters())


def lpips_skip_reason(opts: Options) -> str | None:
    if opts.lpips_weights is None:
        return ("no local LPIPS weights (loss.vgg_weights / loss.lin_weights are null and nothing downloads); "
                "pass --lpips-weights VGG16.pth,LPIPS_VGG.pth to time it")
    missing = [p for p in opts.lpips_weights if not Path(p).is_file()]
    return f"LPIPS weight files not found: {missing}" if missing else None


def loss_overrides(loss: str, opts: Options) -> list[str]:
    if loss == "lpips" and opts.lpips_weights:
        vgg, lin = (str(Path(p).resolve()) for p in opts.lpips_weights)
        return ["loss=lpips", f"loss.vgg_weights={vgg}", f"loss.lin_weights={lin}"]
    return [f"loss={loss}"]


# ---------------------------------------------------------------------------------------
# Host-device syncs inside the step


SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "equal", "repeat_interleave")


def scan_host_syncs(step, x: Tensor, iteration: int = 0) -> dict[str, Any]:
    """Run one step and list every op that reads a tensor's value back to the host.

    `aten._local_scalar_dense` is what `.item()`, `float(t)`, `bool(t)` and `.tolist()`
    become; `nonzero`, `masked_select`, `unique`... need the result size on the host. On a
    GPU each is a sync point. Adam's per-parameter step counter is a CPU tensor on every
    device (capturable=False), so reading it is not one; those are counted apart.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    step(x, iteration)      # optimizer state (and its step counters) exists from here on
    counters = [s["step"] for s in step.optimizer.state.values() if torch.is_tensor(s.get("step"))]
    here = Path(__file__).resolve().parent

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.optimizer_counter_reads = 0
            self.syncs: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNC_OPS:
                if name == "_local_scalar_dense" and any(args[0] is c for c in counters):
                    self.optimizer_counter_reads += 1
                else:
                    frames = [f for f in traceback.extract_stack()[:-1] if str(here) in f.filename]
                    site = f"{Path(frames[-1].filename).relative_to(here.parent)}:{frames[-1].lineno}" if frames else "?"
                    key = f"aten.{name} at {site}"
                    self.syncs[key] = self.syncs.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    recorder = Recorder()
    with recorder:
        step(x, iteration + 1)
    return {"device_sync_ops": recorder.syncs, "device_syncs": sum(recorder.syncs.values()),
            "optimizer_step_counter_reads": recorder.optimizer_counter_reads,
            "method": "TorchDispatchMode over one step call: aten ops " + ", ".join(SYNC_OPS)}


# ---------------------------------------------------------------------------------------
# step


def _time_losses(preset: Preset, losses: list[str], opts: Options, device: torch.device,
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
    losses = ["pseudo_huber", "l2", "l1", "mfd", "lpips"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ayt-bench-") as tmp:
        for preset in (CPU_PRESET, CIFAR_PRESET):
            p = preset_for(preset, opts)
            results[preset.name], steps = _time_losses(p, losses, opts, device, Path(tmp))
            if preset is CPU_PRESET:
                x = random_batch(p, SimpleNamespace(channels_last=False), device, opts.seed)
                results["host_syncs"] = {name: scan_host_syncs(steps[name], x, 10_000)
                                         for name in ("pseudo_huber", "mfd")}
            del steps
    mfd_ratio = results["cpu"]["ratio_to_pseudo_huber"]["mfd"]
    return {
        "config": {"losses": losses, "presets": {"cpu": CPU_PRESET.description, "cifar_small": CIFAR_PRESET.description},
                   "built_by": "ayt.training.loop.build_training (scratch init, random feature map)",
                   "timed": "one ConsistencyStep call: noise, pairs, target and prediction passes, loss, "
                            "backward, Adam, EMA", "quick": opts.quick},
        "results": results,
        "targets": {"mfd_step_over_pseudo_huber_cpu": {"value": mfd_ratio, "target": f"<= {TARGET_MFD_STEP_RATIO}",
                                                       "met": mfd_ratio <= TARGET_MFD_STEP_RATIO}},
        "headline": f"CPU preset: MFD step {mfd_ratio:.2f}x pseudo-Huber "
                    f"({results['cpu']['losses']['mfd']['median_s'] * 1e3:.0f} ms vs "
                    f"{results['cpu']['losses']['pseudo_huber']['median_s'] * 1e3:.0f} ms)",
    }


# ---------------------------------------------------------------------------------------
# switches


SWITCH_BATCH = 32


@benchmark("switches")
def bench_switches(opts: Options) -> dict[str, Any]:
    """channels_last / bf16 / compile against the default (fp32, contiguous, eager), CPU preset, MFD."""
    device = resolve(opts.device)
    preset = replace(preset_for(CPU_PRESET, opts), batch=4 if opts.quick else SWITCH_BATCH)
    variants = {"default": [], "channels_last": ["channels_last=true"], "bf16": ["precision=bf16"]}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ayt-bench-") as tmp:
        built = {name: build_step(preset, ov, device, Path(tmp), opts.seed) for name, ov in variants.items()}
        inputs = {name: random_batch(preset, cfg, device, opts.seed) for name, (_, cfg) in built.items()}
        fns = {name: (lambda i, s=step, x=inputs[name]: s(x, i)) for name, (step, _) in built.items()}
        compile_info: dict[str, Any] = {"skipped": "torch.compile takes minutes to compile here; pass --compile"}
        if opts.compile:
            compile_info, fns["compile"] = _compiled_step(preset, opts, device, Path(tmp))
        times = time_interleaved(fns, opts.warmup, opts.repeats, device)
    stats = {name: summarize(t) for name, t in times.items()}
    for name, s in stats.items():
        results[name] = {**s, "speedup_vs_default": ratio(stats["default"], s)}
    if opts.compile:
        results["compile"].update(compile_info)
    else:
        results["compile"] = compile_info
    helps = {name: r["speedup_vs_default"] > 1.05 for name, r in results.items()
             if name != "default" and "median_s" in r}
    return {
        "config": {"preset": preset.description, "batch_size": preset.batch, "loss": "mfd (the config default)",
                   "variants": {**{k: v or ["(config defaults)"] for k, v in variants.items()},
                                "compile": ["compile=true"]},
                   "note": f"batch {preset.batch}, not 128: bf16 autocast is very slow on this CPU and would not fit "
                           "the time budget at 128"},
        "results": results,
        "helps_here": helps,
        "headline": ", ".join(f"{k} {r['speedup_vs_default']:.2f}x" for k, r in results.items()
                              if k != "default" and "speedup_vs_default" in r),
    }


def _compiled_step(preset: Preset, opts: Options, device: torch.device, workdir: Path):
    """A compile=true step, compiled from a fresh inductor cache; the first call is timed apart."""
    cache = workdir / "inductor-cache"
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    try:
        step, cfg = build_step(preset, ["compile=true"], device, workdir, opts.seed)
        x = random_batch(preset, cfg, device, opts.seed)
        synchronize(device)
        start = time.perf_counter()
        step(x, 0)
        step(x, 1)      # a second call may recompile (guards on the first call's state)
        synchronize(device)
        first = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return {"first_two_calls_s_including_compilation": first, "inductor_cache": "fresh (cold)"}, \
        (lambda i: step(x, i + 2))


# ---------------------------------------------------------------------------------------
# mfd: optimised against naive


def naive_mfd_terms(feature_map: nn.Module, pred: Tensor, target: Tensor, eps: float = 1e-5) -> dict[str, Tensor]:
    """MFD in normalised-gradient form written the plain way (ALGORITHM §4), for comparison only.

    dist(a, b) = sum_layers sum_channels rho(|phi_lc(a) - phi_lc(b)|_2 over space),
    rho(u) = sqrt(u^2 + eps^2) - eps; g = d dist / d a; g_hat = g / max(|g|, 1e-5);
    loss = 1/2 |a - stopgrad(a - g_hat)|^2. `feature_map` has trainable parameters, the
    target goes through its own forward pass with autograd recording, the norm is
    `torch.linalg.vector_norm`, and g comes from a plain `.backward()` (which also fills
    the feature map's parameter gradients, thrown away here).
    """
    a = pred.detach().clone().requires_grad_(True)
    feats_a = feature_map.features(a)
    feats_t = feature_map.features(target)
    dist = torch.zeros(a.shape[0], device=a.device)
    for fa, ft in zip(feats_a, feats_t):
        u = torch.linalg.vector_norm(fa - ft, dim=(2, 3))                  # [B, channels]
        dist = dist + (torch.sqrt(u ** 2 + eps ** 2) - eps).sum(dim=1)
    dist.sum().backward()
    feature_map.zero_grad(set_to_none=True)
    g = a.grad
    g_hat = g / g.flatten(1).norm(dim=1).clamp_min(1e-5).view(-1, 1, 1, 1)
    moved = (pred - g_hat).detach()
    return {"loss": 0.5 * (pred - moved).flatten(1).square().sum(1), "dist": dist.detach()}


def mfd_pair(preset: Preset, device: torch.device, seed: int = 0):
    """(optimised loss, naive feature map, pred, target) with the same weights and inputs."""
    from ayt.config import compose_config
    from ayt.method.losses import ManifoldFeatureDistance
    from ayt.training.prepare import load_feature_map
    cfg = compose_config(list(preset.overrides))
    with tempfile.TemporaryDirectory(prefix="ayt-bench-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        frozen = load_feature_map(random_feature_map_file(cfg, preset.resolution, preset.channels, Path(tmp)), device)
    naive_fm = copy.deepcopy(frozen).eval().requires_grad_(True)      # same weights, eval-mode BatchNorm
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (preset.batch, preset.channels, preset.resolution, preset.resolution)
    target = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    pred = (target + 0.3 * torch.randn(shape, generator=gen).to(device)).requires_grad_(True)
    return ManifoldFeatureDistance(frozen, eps=float(cfg.loss.get("eps", 1e-5))), naive_fm, pred, target


def gradient_wrt_prediction(terms_fn: Callable[[Tensor], dict[str, Tensor]], pred: Tensor) -> Tensor:
    """d sum(loss) / d pred, the gradient the step sends into the network's output."""
    pred.grad = None
    terms_fn(pred)["loss"].sum().backward()
    return pred.grad.detach().clone()


def mfd_gradients(preset: Preset, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Gradients w.r.t. the prediction of both MFD forms, and whether they agree."""
    optimised, naive_fm, pred, target = mfd_pair(preset, device, seed)
    g_opt = gradient_wrt_prediction(lambda p: optimised(p, target, 0), pred)
    g_naive = gradient_wrt_prediction(lambda p: naive_mfd_terms(naive_fm, p, target, optimised.eps), pred)
    diff = (g_opt - g_naive).abs()
    return {"optimised": g_opt, "naive": g_naive, "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / g_naive.abs().clamp_min(1e-12)).max()),
            "allclose": bool(torch.allclose(g_opt, g_naive, rtol=MFD_RTOL, atol=MFD_ATOL)),
            "tolerance": {"rtol": MFD_RTOL, "atol": MFD_ATOL}}


@benchmark("mfd")
def bench_mfd(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    results: dict[str, Any] = {}
    for base in (CPU_PRESET, CIFAR_PRESET):
        preset = preset_for(base, opts)
        check = mfd_gradients(preset, device, opts.seed)
        if not check["allclose"]:
            raise AssertionError(f"naive and optimised MFD gradients differ at {base.name}: "
                                 f"max abs diff {check['max_abs_diff']:.3g}")
        optimised, naive_fm, pred, target = mfd_pair(preset, device, opts.seed)
        fns = {"optimised": lambda i: gradient_wrt_prediction(lambda p: optimised(p, target, i), pred),
               "naive": lambda i: gradient_wrt_prediction(
                   lambda p: naive_mfd_terms(naive_fm, p, target, optimised.eps), pred)}
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
                   "naive": "ayt.bench.naive_mfd_terms: feature-map parameters requiring grad, target features "
                            "with autograd recording, linalg.vector_norm, plain .backward() (parameter grads too)",
                   "same_weights_and_inputs": True, "tolerance": {"rtol": MFD_RTOL, "atol": MFD_ATOL},
                   "presets": {"cpu": CPU_PRESET.description, "cifar_small": CIFAR_PRESET.description}},
        "results": results,
        "targets": {"optimised_mfd_speedup_cpu": {"value": speedup, "target": f">= {TARGET_MFD_SPEEDUP}",
                                                  "met": speedup >= TARGET_MFD_SPEEDUP}},
        "headline": f"optimised MFD {speedup:.2f}x faster than naive at the CPU preset "
                    f"({results['cifar_small']['speedup']:.2f}x at cifar_small); gradients equal",
    }


# ---------------------------------------------------------------------------------------
# ray: Ray Train (1 worker) against the plain loop


def trial_overrides(out_dir: Path, iterations: int, threads: int) -> list[str]:
    """A smoke-sized trial whose artifacts (feature map, FID classifier) build in seconds."""
    return ["experiment=smoke", f"out_dir={out_dir}", "progress=false", "training.init=scratch",
            "feature_map.iterations=20", "fid.classifier.iterations=20", "fid.num_samples=100",
            f"training.iterations={iterations}", f"training.eval_every={iterations}",
            f"training.checkpoint_every={iterations}", f"cpu_threads={threads}"]


def _run_trial(overrides: list[str]) -> dict[str, Any]:
    from ayt.config import load_config
    from ayt.train import run
    cfg = load_config(overrides)
    start = time.perf_counter()
    summary = run(cfg, progress=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_seconds": float(summary["train_seconds"]), "iterations": int(summary["iteration"]),
            "s_per_step": float(summary["train_seconds"]) / int(summary["iteration"])}


def _start_ray() -> tuple[float, bool]:
    """A fresh local Ray as `ayt.training.ray_train.connect` starts one (dashboard on 127.0.0.1);
    address="local" so that it never joins another session's cluster."""
    import ray
    if ray.is_initialized():
        return 0.0, False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    return time.perf_counter() - start, True


@benchmark("ray")
def bench_ray(opts: Options) -> dict[str, Any]:
    import ray
    iterations = 10 if opts.quick else opts.ray_iterations
    threads = opts.ray_threads
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ayt-bench-ray-") as tmp:
        common = trial_overrides(Path(tmp), iterations, threads)
        if opts.quick:
            common += ["network.model_channels=8", "network.channel_mult=[1]", "batch_size=8"]
        # The first local run also builds the shared artifacts (its wall time says so); local
        # runs before and after the Ray run bracket any drift of the machine's load.
        local_first = _run_trial(common + ["scaling.backend=local", "name=bench-local-1"])
        init_s, started = _start_ray()
        try:
            ray_run = _run_trial(common + ["scaling.backend=ray", "scaling.num_workers=1", "name=bench-ray"])
            study = run_study_trials(opts, common, iterations)
        finally:
            if started:
                ray.shutdown()
        local_second = _run_trial(common + ["scaling.backend=local", "name=bench-local-2"])
        study = compare_study_with_loop(study, common)
        # Against the faster of the two bracketing local runs: the first one also pays its
        # process's cold start (measured 0.153 vs 0.115 s/step), which flattered Ray when
        # the two were averaged (0.87x in studies/benchmarks/results.json, 1.01x vs the warm run).
        local_step = min(local_first["s_per_step"], local_second["s_per_step"])
        per_step_ratio = ray_run["s_per_step"] / local_step
        results = {
            "local_first": local_first, "ray": ray_run, "local_second": local_second,
            "ray_init_s": init_s,
            "per_step_ratio_ray_over_local": per_step_ratio,
            "per_step_overhead": per_step_ratio - 1.0,
            "ray_fixed_overhead_s": (ray_run["wall_s"] - ray_run["train_seconds"])
                                    - (local_second["wall_s"] - local_second["train_seconds"]),
            "study": study,
        }
    return {
        "config": {"trial": common, "local": ["scaling.backend=local"],
                   "ray": ["scaling.backend=ray", "scaling.num_workers=1"],
                   "per_step": "train_seconds / iterations as the loop reports it (time between FID/checkpoint "
                               "boundaries: data loading + step + logging; FID, checkpoints and start-up excluded)",
                   "ray_init": "ray.init(address='local', include_dashboard=True) before the run, timed apart",
                   "ray_fixed_overhead": "(wall - train_seconds) of the Ray run minus that of the second local "
                                         "run: worker group start, Train controller, checkpoint upload",
                   "threads": f"cpu_threads={threads} in both runs: one thread per process, as a worker reserving "
                              "CPU: 1 runs (Ray sets OMP_NUM_THREADS=1 in it); on 2 shared cores two OpenMP threads "
                              "per process are pathologically slow whenever anything else runs"},
        "results": results,
        "targets": {"ray_train_per_step_overhead": {"value": results["per_step_overhead"],
                                                    "target": f"<= {TARGET_RAY_OVERHEAD}",
                                                    "met": results["per_step_overhead"] <= TARGET_RAY_OVERHEAD}},
        "headline": f"Ray Train per-step {per_step_ratio:.3f}x the plain loop; ray.init {init_s:.1f} s, "
                    f"fixed overhead {results['ray_fixed_overhead_s']:.1f} s",
    }


STUDY_TRIALS = 2


def run_study_trials(opts: Options, trial: list[str], iterations: int) -> dict[str, Any]:
    """N small trials as a study (`ayt.studies.runner`: Tune + OptunaSearch + one Ray Train
    worker per trial, driver-side MLflow); `compare_study_with_loop` then runs the same N
    trials one after another through the plain loop. The trials differ only in their seed
    (the loss_sweep study with its loss axis cut to mfd and `study.seeds` = 0..N-1), one at
    a time (`study.max_concurrent_trials=1`): the comparison is of machinery, not of
    parallelism. Expects Ray to be running (started by the caller)."""
    try:
        from ayt.studies.runner import plan_study, run_study
    except ImportError:
        # TODO(benchmarks, issue 6): nothing to compare until ayt.studies.runner exists.
        return {"skipped": "study runner not available"}
    from mlflow.tracking import MlflowClient
    n = 2 if opts.quick else STUDY_TRIALS
    # Same out_dir as the plain runs: the artifact cache (feature map, FID classifier and
    # statistics) is already built, so the study's wall time is the trials'.
    keep = [o for o in trial if not o.startswith(("training.iterations=", "training.eval_every=",
                                                      "training.checkpoint_every=", "experiment="))]
    plan = plan_study("loss_sweep", ["study.axes.loss=[mfd]",
                                     f"study.seeds=[{','.join(map(str, range(n)))}]",
                                     "study.budget.unit=iterations", f"study.budget.amount={iterations}",
                                     "study.budget.evals=1", "study.max_concurrent_trials=1",
                                     f"training.checkpoint_every={iterations}", *keep])
    start = time.perf_counter()
    summary = run_study(plan, progress=False)
    study_wall = time.perf_counter() - start
    client = MlflowClient(str(plan.base.tracking.uri))
    experiment = client.get_experiment_by_name(str(plan.base.tracking.experiment))
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    return {"trials": n, "iterations_per_trial": iterations, "errors": summary["errors"],
            "study_wall_s": study_wall,
            "study_train_seconds": [float(r.data.metrics["train_seconds"]) for r in children],
            "study_overrides": plan.argv}


def compare_study_with_loop(study: dict[str, Any], trial: list[str]) -> dict[str, Any]:
    """The plain-loop side of the study comparison (run with Ray shut down)."""
    if "skipped" in study:
        return study
    n = int(study["trials"])
    local = [_run_trial(trial + [f"seed={seed}", "scaling.backend=local", f"name=bench-study-local-{seed}"])
             for seed in range(n)]
    local_wall = sum(r["wall_s"] for r in local)
    local_train = [r["train_seconds"] for r in local]
    return {**study, "local_wall_s_sum": local_wall, "local_train_seconds": local_train,
            "wall_ratio_study_over_local": study["study_wall_s"] / local_wall,
            "train_seconds_ratio_study_over_local": statistics.mean(study["study_train_seconds"])
            / statistics.mean(local_train),
            "study_overhead_s_per_trial": (study["study_wall_s"] - local_wall) / n}


# ---------------------------------------------------------------------------------------
# fid: one evaluation against the training between two of them


@benchmark("fid")
def bench_fid(opts: Options) -> dict[str, Any]:
    from ayt.config import compose_config
    from ayt.data import load_dataset
    from ayt.eval.classifier import DigitClassifier, save_classifier
    from ayt.networks.precond import build_denoiser
    from ayt.training.loop import FIDProbe
    from ayt.training.prepare import Artifacts
    device = resolve(opts.device)
    preset = preset_for(CPU_PRESET, opts)
    extra = ["fid.num_samples=20", "fid.batch_size=10"] if opts.quick else []
    cfg = compose_config([*preset.overrides, *extra])
    data = load_dataset(cfg.dataset, train=True)
    repeats = max(1, min(opts.repeats, 3))
    with tempfile.TemporaryDirectory(prefix="ayt-bench-fid-") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            classifier = DigitClassifier(data.channels, data.resolution, data.num_classes,
                                         width=int(cfg.fid.classifier.width))
            net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device).eval()
        weights = str(Path(tmp) / "classifier.pt")
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
            evaluation(str(Path(tmp) / f"fid-warmup-{i}"))
        uncached = [evaluation(str(Path(tmp) / f"fid-cold-{i}")) for i in range(repeats)]
        warm_cache = str(Path(tmp) / "fid-cold-0")
        cached = [evaluation(warm_cache) for _ in range(repeats)]
        step_stats = _default_step_time(opts, device, Path(tmp))
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


def _default_step_time(opts: Options, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Median step time of the default config's loss at the CPU preset."""
    preset = preset_for(CPU_PRESET, opts)
    step, cfg = build_step(preset, [], device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    times = time_interleaved({"step": lambda i: step(x, i)}, opts.warmup, max(1, min(opts.repeats, 3)), device)
    return {**summarize(times["step"]), "loss": str(cfg.loss.name)}


# ---------------------------------------------------------------------------------------
# roofline


def count_step_flops(preset: Preset, opts: Options, device: torch.device, workdir: Path) -> dict[str, int]:
    """FLOPs of one step: the U-Net's forward + backward (FlopCounterMode over a whole
    pseudo-Huber step: target pass, prediction pass, backward) and the feature map's passes
    of the MFD loss.

    FlopCounterMode's module tracker cannot run inside `torch.autograd.grad` (which the MFD
    loss uses), so the feature-map part is counted on the same computation written with
    `.backward()`: `manifold_feature_distance` itself, then the input-gradient backward.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from ayt.method.losses import manifold_feature_distance
    step, cfg = build_step(preset, ["loss=pseudo_huber"], device, workdir, opts.seed)
    x = random_batch(preset, cfg, device, opts.seed)
    step(x, 0)
    with FlopCounterMode(display=False) as counter:
        step(x, 1)
    unet = counter.get_total_flops()
    mfd_step, _ = build_step(preset, ["loss=mfd"], device, workdir, opts.seed)
    a = torch.rand(x.shape, device=device).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        manifold_feature_distance(mfd_step.loss.feature_map, a, torch.rand_like(x), mfd_step.loss.eps).sum().backward()
    return {"unet_forward_backward": unet, "feature_map_mfd": counter.get_total_flops()}


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
    with tempfile.TemporaryDirectory(prefix="ayt-bench-") as tmp:
        counted = count_step_flops(preset, opts, device, Path(tmp))
        flops = {"pseudo_huber": {"unet_forward_backward": counted["unet_forward_backward"], "feature_map_mfd": 0},
                 "mfd": counted}
        for count in flops.values():
            count["total"] = count["unet_forward_backward"] + count["feature_map_mfd"]
        steps = {loss: build_step(preset, [f"loss={loss}"], device, Path(tmp), opts.seed) for loss in flops}
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


# ---------------------------------------------------------------------------------------
# Driver


def run_benchmark(name: str, opts: Options) -> dict[str, Any]:
    """One benchmark's JSON record (machine, torch, options, config, results)."""
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    device = resolve(opts.device)
    machine = machine_info()
    start_load = machine.pop("loadavg")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    body = BENCHMARKS[name](opts)
    record = {"benchmark": name, "started": started, "wall_s": time.perf_counter() - start,
              "machine": {**machine, "loadavg_start": start_load, "loadavg_end": list(os.getloadavg())},
              "torch": torch_info(device), "options": _jsonable(asdict(opts)), **body}
    return _jsonable(record)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)


def write_records(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """A `.json` file gets one JSON list; any other name gets JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def parse_args(argv: list[str] | None) -> tuple[list[str], Options, str | None]:
    parser = argparse.ArgumentParser(prog="python -m ayt.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=["all"], choices=[*ALL, "all"], metavar="which",
                        help=f"benchmarks to run: {', '.join(ALL)} or all (default)")
    parser.add_argument("--out", help="also write the records here: FILE.json one JSON list, else JSON lines")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=Options.repeats, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=Options.warmup, help="untimed calls per variant first")
    parser.add_argument("--device", default=Options.device, help="auto (default) | cpu | cuda | mps")
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches: checks the harness only")
    parser.add_argument("--compile", action="store_true", help="switches: also torch.compile (minutes)")
    parser.add_argument("--lpips-weights", help="VGG16.pth,LPIPS_VGG.pth: time the LPIPS loss too")
    parser.add_argument("--ray-iterations", type=int, default=Options.ray_iterations,
                        help="optimizer steps of the ray benchmark's trial")
    parser.add_argument("--ray-threads", type=int, default=Options.ray_threads,
                        help="cpu_threads of the ray benchmark's trials (both paths)")
    args = parser.parse_args(argv)
    which = list(ALL) if "all" in args.which else list(dict.fromkeys(args.which))
    lpips = tuple(args.lpips_weights.split(",")) if args.lpips_weights else None
    if lpips is not None and len(lpips) != 2:
        parser.error("--lpips-weights takes two comma-separated paths: VGG16.pth,LPIPS_VGG.pth")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    opts = Options(repeats=args.repeats, warmup=args.warmup, threads=args.threads, device=args.device,
                   quick=args.quick, compile=args.compile, lpips_weights=lpips, ray_iterations=args.ray_iterations,
                   ray_threads=args.ray_threads)
    return which, opts, args.out


def main(argv: list[str] | None = None) -> int:
    which, opts, out = parse_args(sys.argv[1:] if argv is None else argv)
    records = []
    for name in which:
        record = run_benchmark(name, opts)
        records.append(record)
        print(json.dumps(record), flush=True)
        print(f"ayt.bench {name}: {record.get('headline', '')} ({record['wall_s']:.0f} s)", file=sys.stderr,
              flush=True)
        if out:
            write_records(records, out)     # after each one: a later failure keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
