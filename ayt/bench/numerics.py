"""`numerics`: does bf16 (and, on a GPU, tf32) keep the direction the losses train on?

At the paper's q = 256 the two inputs of a consistency pair differ by about 0.4-2% relative,
one to three bf16 rounding steps, and both losses train on the direction of
D(x_t, t) - D(x_r, r). This benchmark computes, on cifar10_paper's network (DDPM++ at
32x32x3, as the preset builds it) and schedule, for probe pairs at stratified quantiles of
the training t-distribution (`ayt.eval.tangent`'s probe set, `T_BINS` equal-probability
bins), per precision against strict fp32 (`ayt.precision`):

  delta      cos(D_t - D_r in the precision, D_t - D_r in fp32), D_r the target as the step
             builds it (x itself where r = 0); pseudo-Huber's gradient w.r.t. the prediction
             at c = 0 (ECT's) is this direction normalised, so its cosine is the same number
  branch     the same for the network's own term c_out(t) F_t - c_out(r) F_r (the skip term
             c_skip x is computed in fp32 under every policy)
  grad_<loss> cos of the gradient of the loss w.r.t. the prediction (pseudo-Huber, MFD through a
             VGG16-shaped feature map), computed as the step does: outside autocast, under the
             policy's flags

Each per bin as mean and minimum over its probes, and the precision's verdict: it keeps the
direction when every bin's mean cosine of `delta` and of every loss gradient is at least
THRESHOLD, in every weight setting. cifar10_paper's `precision` is the fastest that keeps it:
bf16, else tf32, else strict fp32 (`preset_choice`; tests/test_numerics.py holds the preset
to the committed record).

TF32 has no CPU kernels: off a GPU it is emulated (`TF32Emulation`): the fp32 inputs of every
convolution, linear layer and attention product are rounded to TF32's 10-bit mantissa (round
to nearest even), the products summed in fp32, as tensor cores do. Under bf16 the parts
outside autocast (the loss and its feature map) get the same emulation, as on a GPU they run
as tf32. On a GPU (`--device cuda`) both run on the hardware.

Weights are random (no trained network is available offline), in two settings: `own`, the
network's own initialisation (edm's: the last conv of every residual block, the attention
projections and the output conv at 1e-5 scale, so F's output is ~1e-5 of a trained network's
and D is almost the fp32 skip term), and `full_scale`, the same weights with those layers
redrawn at Xavier scale 1 (every block contributes, as in a trained network), the harder
case. The network runs in eval mode (no dropout) so both precisions compute the same function.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ayt.bench import Options, benchmark
from ayt.bench.harness import resolve
from ayt.config import compose_config
from ayt.eval.tangent import build_probe_set
from ayt.method.augment import AugmentPipeline
from ayt.method.losses import LossResources, build_loss
from ayt.method.schedule import ConsistencySchedule
from ayt.networks.feature_map import FeatureMap
from ayt.networks.precond import build_denoiser
from ayt.precision import PRECISIONS, apply_precision, preserved_backend_flags

PRESET = ["experiment=cifar10_paper", "training.init=scratch"]
QUICK = ["network.model_channels=16", "network.num_blocks=1", "feature_map.channels=[8,8,8,8,8]",
         "feature_map.convs_per_stage=1"]
T_BINS, PER_BIN = 8, 3                     # 24 probe pairs (quick: 4 x 2)
CHUNK = 32                                 # probe pairs per forward pass
THRESHOLD = 0.99                           # mean cosine per t-bin: an angle of at most 8.1 degrees
LOSSES = ("pseudo_huber", "mfd")
SMALL_INIT = 1e-3                          # a weight tensor with max |w| below this was drawn at 1e-5 scale
FULL_SCALE_NOTE = ("the layers edm initialises at 1e-5 scale (last conv of each residual block, attention "
                   "projections, output conv) redrawn at Xavier scale 1")


@benchmark("numerics")
def bench_numerics(opts: Options) -> dict[str, Any]:
    device = resolve(opts.device)
    cfg = compose_config(PRESET + (QUICK if opts.quick else []))
    t_bins, per_bin = (4, 2) if opts.quick else (T_BINS, PER_BIN)
    schedule = ConsistencySchedule.from_config(cfg.schedule, cfg.edm)
    resolution, channels = int(cfg.dataset.resolution), 3
    gen = torch.Generator().manual_seed(opts.seed)
    images = smooth_images(t_bins * per_bin, channels, resolution, gen)
    probes = build_probe_set(images, opts.seed, t_bins * per_bin, t_bins, schedule)
    pair = schedule.pair(probes.x, probes.n, probes.eps, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        net = build_denoiser(cfg.network, cfg.edm, resolution, channels).eval().requires_grad_(False)
        losses = {name: loss_for(name, cfg, channels, resolution, device) for name in LOSSES}
    compared = [p for p in PRECISIONS if p != "fp32"]
    emulated = device.type != "cuda"
    results: dict[str, Any] = {}
    for setting in ("own", "full_scale"):
        if setting == "full_scale":
            redrawn = full_scale_(net, opts.seed)
        net.to(device)
        ref = measure(net, pair, schedule, losses, "fp32", device)
        results[setting] = {
            p: per_bin_cosines(measure(net, pair, schedule, losses, p, device, emulate_tf32=emulated), ref,
                               probes.bins, t_bins)
            for p in compared}
        results[setting]["branch_share_fp32"] = per_bin_stat(
            ref["branch"].flatten(1).norm(dim=1) / ref["delta"].flatten(1).norm(dim=1).clamp_min(1e-30),
            probes.bins, t_bins)
        net.cpu()
    verdicts = {p: verdict(results, p) for p in compared}
    choice = preset_choice(verdicts)
    return {
        "config": {
            "network": f"cifar10_paper's DDPM++ ({'quick: tiny width; ' if opts.quick else ''}"
                       f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters), eval mode (no dropout)",
            "weights": {"own": "random, the network's own initialisation (edm's DDPM++ init)",
                        "full_scale": f"random: {FULL_SCALE_NOTE} ({redrawn} tensors)"},
            "feature_map": f"random init, cifar10_paper's {cfg.feature_map.name} shape "
                           f"(channels {list(cfg.feature_map.channels)}, {cfg.feature_map.convs_per_stage} convs per "
                           "stage), eval mode, frozen",
            "images": f"{t_bins * per_bin} smooth random images in [-1, 1] (8x8 uniform noise, bilinear to "
                      f"{resolution}x{resolution}; no dataset is read)",
            "pairs": f"schedule {dict(q=float(cfg.schedule.q), k=float(cfg.schedule.k), b=float(cfg.schedule.b))}, "
                     f"stage 0; t at {t_bins} equal-probability bins of the training t-distribution "
                     f"(p_mean {cfg.schedule.p_mean}, p_std {cfg.schedule.p_std}), {per_bin} probes each",
            "t_bin_edges": [round(e, 5) for e in probes.edges],
            "reference": "precision=fp32 (strict: TF32 off)",
            "tf32": ("emulated (TF32Emulation: conv/linear/attention inputs rounded to a 10-bit mantissa, "
                     "fp32 sums), also for bf16's parts outside autocast") if emulated else "the GPU's own",
            "compared": compared,
            "threshold": THRESHOLD,
            "rule": "a precision keeps the direction when, in every weight setting, every t-bin's mean cosine "
                    "of delta and of each loss gradient is >= threshold",
            "device": str(device), "quick": opts.quick},
        "results": results,
        "verdicts": verdicts,
        "precision_for_cifar10_paper": choice,
        "headline": "; ".join(f"{p} vs fp32: worst t-bin mean cosine {v['worst']['value']:.3f} ({v['worst']['quantity']}, "
                              f"{v['worst']['setting']} weights, t-bin {v['worst']['bin']}), "
                              f"{'keeps' if v['keeps_direction'] else 'does not keep'} the direction"
                              for p, v in verdicts.items())
                    + f" (threshold {THRESHOLD}) -> cifar10_paper: {choice}",
    }


def preset_choice(verdicts: dict[str, dict[str, Any]]) -> str:
    """The fastest precision that keeps the direction: bf16, else tf32, else strict fp32."""
    return next((p for p in ("bf16", "tf32") if verdicts.get(p, {}).get("keeps_direction")), "fp32")


def smooth_images(n: int, channels: int, resolution: int, gen: torch.Generator) -> Tensor:
    """Images with an image's smoothness, in [-1, 1]: coarse uniform noise, bilinearly upsampled."""
    coarse = torch.rand(n, channels, 8, 8, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)


def loss_for(name: str, cfg, channels: int, resolution: int, device: torch.device = torch.device("cpu")):
    """The loss the preset would build (`loss=<name>`), MFD with a random frozen feature map on `device`."""
    loss_cfg = compose_config(PRESET + [f"loss={name}"]).loss
    fm = cfg.feature_map
    feature_map = FeatureMap(channels, resolution, list(fm.channels), AugmentPipeline(cfg.augment, channels).num_labels,
                             int(fm.convs_per_stage)).freeze().to(device)
    return build_loss(loss_cfg, LossResources(feature_map=lambda: feature_map))


def full_scale_(net: nn.Module, seed: int) -> int:
    """Redraw every weight edm initialised at 1e-5 scale at Xavier scale 1; returns how many."""
    gen = torch.Generator().manual_seed(seed + 1)
    count = 0
    for module in net.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and weight is not None and weight.abs().max() < SMALL_INIT:
            fan_out, fan_in = weight.shape[0], weight[0].numel()
            receptive = weight[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out * receptive))      # xavier_uniform, gain 1
            with torch.no_grad():
                weight.copy_(torch.rand(weight.shape, generator=gen) * 2 * bound - bound)
            count += 1
    return count


def round_to_tf32(x: Any) -> Any:
    """A float32 tensor rounded to TF32 (10-bit mantissa, round to nearest even); anything else as is."""
    if not torch.is_tensor(x) or x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    rounded = bits + (0xFFF + ((bits >> 13) & 1))       # two's complement: the float's bits as unsigned
    return rounded.bitwise_and_(~0x1FFF).view(torch.float32).view(x.shape)


class _TF32Inputs(torch.autograd.Function):
    """Forward: the value rounded to TF32. Backward: the incoming gradient passed on as is."""

    @staticmethod
    def forward(ctx, x):
        return round_to_tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TF32Grad(torch.autograd.Function):
    """Forward: identity. Backward: the gradient rounded to TF32 (it is a product's input there)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return round_to_tf32(grad)


def _tf32(x: Any) -> Any:
    if not torch.is_tensor(x) or x.dtype != torch.float32:
        return x
    return _TF32Inputs.apply(x) if x.requires_grad else round_to_tf32(x)


class TF32Emulation(TorchFunctionMode):
    """fp32 convolutions, linear layers and attention products with their inputs rounded to
    TF32, forward and backward: the arithmetic of TF32 tensor cores (products of rounded
    inputs, fp32 sums). Biases are added in fp32, as in the kernels' epilogues."""

    LAYERS = (F.conv2d, F.linear)                 # (input, weight, bias, ...): the bias is added in fp32
    PRODUCTS = (torch.matmul, torch.mm, torch.bmm, torch.Tensor.__matmul__)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            q, k, v = (_tf32(a) for a in args[:3])
            scores = _TF32Grad.apply(q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            return _TF32Grad.apply(_tf32(torch.softmax(scores, dim=-1)) @ v)
        if func not in self.LAYERS + self.PRODUCTS:
            return func(*args, **kwargs)
        args, bias = list(args), None
        if func in self.LAYERS:
            if len(args) > 2:
                bias, args[2] = args[2], None
            else:
                bias = kwargs.pop("bias", None)
        args[0], args[1] = _tf32(args[0]), _tf32(args[1])
        out = func(*args, **kwargs)
        out = _TF32Grad.apply(out) if out.requires_grad else out
        if bias is not None:
            out = out + (bias.view(1, -1, *([1] * (out.dim() - 2))) if func is F.conv2d else bias)
        return out


def measure(net: nn.Module, pair, schedule: ConsistencySchedule, losses: dict, precision: str,
            device: torch.device, emulate_tf32: bool = False) -> dict[str, Tensor]:
    """delta, branch and each loss's gradient w.r.t. the prediction, for every probe, computed
    under `precision` as the step computes them (on the CPU, [N, C, H, W] float32). With
    `emulate_tf32`, a policy's TF32 arithmetic is emulated (`TF32Emulation`)."""
    policy = PRECISIONS[precision]
    emulation = TF32Emulation() if emulate_tf32 and policy.tf32 else contextlib.nullcontext()
    x, t, r = pair.x.to(device), pair.t.to(device), pair.r.to(device)
    x_t, x_r = pair.x_t.to(device), pair.x_r.to(device)
    captured: list[Tensor] = []
    hook = net.unet.register_forward_hook(lambda module, args, out: captured.append(out.float()))
    out: dict[str, list[Tensor]] = {"delta": [], "branch": [], **{f"grad_{n}": [] for n in losses}}
    try:
        with preserved_backend_flags(), emulation:
            apply_precision(precision, cudnn_benchmark=False)
            for rows in torch.arange(len(x), device=device).split(CHUNK):
                captured.clear()
                with torch.no_grad(), policy.autocast(device):
                    pred = net(x_t[rows], t[rows]).float()
                    d_r = net(x_r[rows], r[rows].clamp_min(schedule.sigma_min)).float()
                f_t, f_r = captured
                view = (-1, 1, 1, 1)
                target = torch.where((r[rows] > 0).view(view), d_r, x[rows])
                c_t = net.coefficients(t[rows]).c_out.view(view)
                c_r = net.coefficients(r[rows].clamp_min(schedule.sigma_min)).c_out.view(view)
                out["delta"].append(pred - target)
                out["branch"].append(c_t * f_t - torch.where((r[rows] > 0).view(view), c_r * f_r, 0.0))
                for name, loss in losses.items():       # outside autocast, as consistency_terms calls it
                    p = pred.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(loss(p, target, 0)["loss"].sum(), p)
                    out[f"grad_{name}"].append(grad)
    finally:
        hook.remove()
    return {key: torch.cat(parts).cpu() for key, parts in out.items()}


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine of two [N, ...] tensors, in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def per_bin_stat(values: Tensor, bins: Tensor, t_bins: int) -> list[dict[str, float]]:
    return [{"mean": float(values[bins == b].mean()), "min": float(values[bins == b].min()),
             "max": float(values[bins == b].max())} for b in range(t_bins)]


def per_bin_cosines(got: dict[str, Tensor], ref: dict[str, Tensor], bins: Tensor, t_bins: int) -> dict[str, Any]:
    """Per t-bin cosine (mean, min, max) and relative error of each quantity against fp32."""
    out = {}
    for key in ref:
        rel = (got[key] - ref[key]).flatten(1).norm(dim=1) / ref[key].flatten(1).norm(dim=1).clamp_min(1e-30)
        out[key] = {"cosine": per_bin_stat(cosines(got[key], ref[key]), bins, t_bins),
                    "relative_error": per_bin_stat(rel.double(), bins, t_bins)}
    return out


def verdict(results: dict[str, Any], precision: str) -> dict[str, Any]:
    """Whether every bin's mean cosine of delta and the loss gradients reaches THRESHOLD in
    every weight setting, and the worst one."""
    worst = None
    for setting, by_precision in results.items():
        for quantity, stats in by_precision[precision].items():
            if quantity == "branch":
                continue
            for b, s in enumerate(stats["cosine"]):
                if worst is None or s["mean"] < worst["value"]:
                    worst = {"value": s["mean"], "quantity": quantity, "setting": setting, "bin": b}
    return {"keeps_direction": bool(worst["value"] >= THRESHOLD), "worst": worst, "threshold": THRESHOLD}
