"""The consistency step and the samplers against hand computations:
gradient accumulation (equal updates, one all-reduce per optimizer step under DDP), the
consistency weight w = 1/(t - r), the one- and two-step samplers, the mixed loss's gradient.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

import contextlib
import copy
import socket

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ayt.method.ema import EMA
from ayt.method.losses import LOSSES, LossResources, ManifoldFeatureDistance, build_loss
from ayt.method.sampling import sample_in_batches, sample_one_step, sample_two_step
from ayt.method.schedule import ConsistencySchedule, PairNoise
from ayt.networks.feature_map import FeatureMap
from ayt.networks.precond import EDMPrecond
from ayt.training.loop import WorkerContext, accumulation_steps, build_training
from ayt.training.prepare import Artifacts
from ayt.training.step import ConsistencyStep

SCHEDULE = ConsistencySchedule()          # AYT: q = 256, so w = 1/(t - r) is far from 1
SIGMA_MIN = 0.002


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(seed: int = 0) -> EDMPrecond:
    """A tiny EDM denoiser without dropout: two forward passes of the same input agree."""
    torch.manual_seed(seed)
    return EDMPrecond(8, 1, sigma_min=SIGMA_MIN, sigma_data=0.5, model_channels=8, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(), dropout=0.0).train()


def _step(net: nn.Module, accum_steps: int, global_batch: int = 8, loss: str = "l2", lr: float = 0.1):
    """A ConsistencyStep with plain SGD: its update is lr * gradient, so a gradient scaled by
    the number of micro-batches shows in the parameters (Adam would normalise it away)."""
    params = getattr(net, "module", net).parameters()
    return ConsistencyStep(net=net, loss=LOSSES[loss](), schedule=SCHEDULE, noise=PairNoise(7, torch.device("cpu")),
                           optimizer=torch.optim.SGD(params, lr=lr), ema=EMA(getattr(net, "module", net), 0.9),
                           global_batch=global_batch, accum_steps=accum_steps)


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _flat_grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


# -- 1. gradient accumulation ----------------------------------------------------------------

@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_step_equals_one_step_on_the_same_global_batch(accum):
    """Mutation caught: dropping `/ len(chunks)` in ConsistencyStep.__call__ (gradient and
    loss `accum` times too large). The noise is keyed by (seed, iteration) and drawn once for
    the global batch, so both runs pair each image with the same t and eps."""
    x = _images()
    whole, split = _net(), _net()
    step1, step_k = _step(whole, 1), _step(split, accum)
    assert torch.equal(_flat_params(whole), _flat_params(split))
    out1, out_k = step1(x, 3), step_k(x, 3)
    assert torch.allclose(out_k["loss"], out1["loss"], rtol=1e-5)
    g1, gk = _flat_grads(whole), _flat_grads(split)
    assert g1.abs().max() > 0
    assert torch.allclose(gk, g1, rtol=1e-4, atol=1e-6 * g1.abs().max().item())
    assert torch.allclose(_flat_params(split), _flat_params(whole), rtol=1e-5, atol=1e-6)
    # the EMA saw the same update too
    assert torch.allclose(_flat_params(step_k.ema.model), _flat_params(step1.ema.model), rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _one_process_group():
    """A real gloo process group of one process, on 127.0.0.1."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _counting_allreduce(counter: list):
    def hook(state, bucket):
        counter.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())      # world size 1: the sum over ranks is the buffer itself
        return fut
    return hook


def test_ddp_all_reduces_gradients_once_per_optimizer_step_not_per_micro_batch():
    """Mutation caught: dropping `self.net.no_sync()` in ConsistencyStep.__call__ (every
    micro-batch's backward then all-reduces: 4 times as many bucket all-reduces per step).
    Also checks the DDP-wrapped accumulated step still gives the unwrapped one-step update."""
    x = _images()
    reference = _net()
    _step(reference, 1)(x, 5)
    with _one_process_group():
        counts = {}
        for accum in (1, 4):
            net = DDP(_net(), bucket_cap_mb=25)
            calls: list[int] = []
            net.register_comm_hook(None, _counting_allreduce(calls))
            step = _step(net, accum)
            step(x, 5)
            counts[accum] = len(calls)
            if accum == 4:
                assert torch.allclose(_flat_params(net.module), _flat_params(reference), rtol=1e-5, atol=1e-6)
    assert counts[1] >= 1
    assert counts[4] == counts[1]


def test_accumulation_steps_divide_the_worker_batch_and_respect_the_cap():
    """Mutations caught: any change to `accumulation_steps` that gives a micro-batch over the
    cap, unequal micro-batches, or more micro-batches than needed (e.g. `ceil(b / cap)`
    without the divisibility search gives 48/20 -> 3 but 40/16 -> 3, which does not divide 40)."""
    assert accumulation_steps(32, None) == 1 and accumulation_steps(32, 0) == 1
    assert accumulation_steps(32, 32) == 1 and accumulation_steps(32, 64) == 1
    assert accumulation_steps(32, 31) == 2
    assert accumulation_steps(40, 16) == 4          # 3 micro-batches do not divide 40; 4 x 10
    assert accumulation_steps(36, 10) == 4          # 4 x 9
    for batch in range(1, 65):
        for cap in range(1, 70):
            a = accumulation_steps(batch, cap)
            assert batch % a == 0 and batch // a <= cap
            assert all(batch % smaller or batch // smaller > cap for smaller in range(1, a))


def test_batch_per_worker_max_reaches_the_step():
    """Mutation caught: `build_training` ignoring `scaling.batch_per_worker_max` (e.g.
    `accum_steps=1`, or passing the global batch instead of the per-worker batch)."""
    from ayt.config import compose_config
    cfg = compose_config(["experiment=smoke", "loss=pseudo_huber", "training.init=scratch", "batch_size=32",
                          "scaling.batch_per_worker_max=8"])
    step = build_training(cfg, Artifacts(), WorkerContext(torch.device("cpu")), _Data())
    assert step.accum_steps == 4 and step.global_batch == 32
    ctx = WorkerContext(torch.device("cpu"), rank=1, world_size=2)    # 16 per worker -> 2 x 8
    assert build_training(cfg, Artifacts(), ctx, _Data()).accum_steps == 2


class _Data:
    resolution, channels = 16, 1


# -- 2. the consistency weight w = 1 / (t - r) -----------------------------------------------

def test_step_loss_and_gradient_are_the_hand_weighted_per_sample_loss():
    """Mutation caught: removing `pair.weight *` in ConsistencyStep.__call__ (the AYT schedule's
    w = 1/(t - r) is ~100-10^5 here, so the loss and gradient change by orders of magnitude);
    also any change to w's formula in ConsistencyPair.weight."""
    x, it, b = _images(6, seed=2), 11, 6
    net = _net(3)
    ref = copy.deepcopy(net)
    step = _step(net, 1, global_batch=b)
    out = step(x, it)
    # By hand: the step's noise is keyed by (seed, iteration) only.
    n, eps = PairNoise(7, torch.device("cpu")).draw(it, b, (1, 8, 8))
    t = torch.exp(-1.1 + 2.0 * n).clamp(SIGMA_MIN, 80.0)
    r = t * (1 - (1 + 8 * torch.sigmoid(-t)) / 256)
    w = 1.0 / (t - r)
    assert w.min() > 10 and not torch.allclose(w, torch.ones_like(w))
    with torch.no_grad():
        target = ref(x + r.view(-1, 1, 1, 1) * eps, r.clamp_min(SIGMA_MIN))
    pred = ref(x + t.view(-1, 1, 1, 1) * eps, t)
    per_sample = (pred - target).flatten(1).square().sum(1)
    expected = (w * per_sample).mean()
    expected.backward()
    assert torch.allclose(out["loss"], expected.detach(), rtol=1e-5)
    g_ref, g_step = _flat_grads(ref), _flat_grads(net)
    assert torch.allclose(g_step, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


# -- 4. samplers -------------------------------------------------------------------------------

class _Recorder(nn.Module):
    """A test double for the denoiser: records each (x, sigma) and returns x / (1 + sigma)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return x / (1 + sigma.view(-1, 1, 1, 1))


def test_one_step_sampler_denoises_sigma_max_times_z_at_sigma_max():
    """Mutations caught: not scaling z by sigma_max, or passing another sigma to the denoiser."""
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    d = _Recorder()
    out = sample_one_step(d, z, 80.0)
    (x, sigma), = d.calls
    assert torch.equal(x, 80.0 * z) and torch.equal(sigma, torch.full((3,), 80.0))
    assert torch.allclose(out, 80.0 * z / 81.0)


def test_two_step_sampler_renoises_with_z2_and_the_sigma_min_corrected_scale():
    """Mutations caught in sample_two_step: using `z` instead of `z2` for the second noise;
    dropping the `math.sqrt(t_mid**2 - sigma_min**2) * z2` term; replacing the scale by `t_mid`
    (sigma_min is 0.3 here, so sqrt(t_mid^2 - sigma_min^2) = 0.4 differs from t_mid = 0.5);
    denoising the second pass at another sigma than t_mid."""
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    z2 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    d = _Recorder()
    out = sample_two_step(d, z, z2, sigma_max=80.0, t_mid=0.5, sigma_min=0.3)
    assert len(d.calls) == 2
    (x1_in, s1), (x2_in, s2) = d.calls
    assert torch.equal(x1_in, 80.0 * z) and torch.equal(s1, torch.full((3,), 80.0))
    x1 = 80.0 * z / 81.0
    assert torch.allclose(x2_in, x1 + 0.4 * z2, atol=1e-12)
    assert torch.allclose(s2, torch.full((3,), 0.5, dtype=s2.dtype))
    assert torch.allclose(out, (x1 + 0.4 * z2) / 1.5, atol=1e-12)


def test_sample_in_batches_keeps_rows_of_both_noises_together_and_clamps():
    """Mutations caught in sample_in_batches: chunking only the first noise, dropping the
    clamp to [-1, 1], or losing the last partial chunk."""
    z = torch.randn(7, 1, 2, 2, dtype=torch.float64)
    z2 = torch.randn(7, 1, 2, 2, dtype=torch.float64)
    out = sample_in_batches(lambda a, b: a * 0.1 + b * 10, z, z2, batch_size=3)
    assert torch.equal(out, (z * 0.1 + z2 * 10).clamp(-1, 1))


# -- 5. the mixed loss's gradient --------------------------------------------------------------

def _feature_map():
    torch.manual_seed(0)
    fm = FeatureMap(1, 8, [4, 8, 8], num_labels=3)
    fm.eval()
    with torch.no_grad():
        for m in fm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return fm.freeze()


@pytest.mark.parametrize("iteration, ramp", [(1, 0.2), (50, 1.0)])
def test_mixed_loss_gradient_is_pixel_plus_weighted_mfd_gradient(iteration, ramp):
    """Mutations caught in Mixed.__call__: detaching the MFD term (`m["loss"].detach()`) or
    replacing it by its value 0.5 (a constant): either leaves only the pixel gradient; also a
    wrong weight (lam or ramp missing) on the MFD term's gradient."""
    fm = _feature_map()
    cfg = {"name": "mixed", "pixel": "pseudo_huber", "huber_c": 0.0, "lam": 2.0, "n_ramp": 10, "eps": 1e-5}
    mixed = build_loss(OmegaConf.create(cfg), LossResources(feature_map=lambda: fm))
    g = torch.Generator().manual_seed(4)
    pred0, target = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])

    def grad_of(loss_fn):
        pred = pred0.clone().requires_grad_(True)
        (w * loss_fn(pred, target, iteration)["loss"]).sum().backward()
        return pred.grad

    g_mixed = grad_of(mixed)
    g_pixel = grad_of(LOSSES["pseudo_huber"](0.0))
    g_mfd = grad_of(ManifoldFeatureDistance(fm))
    # the MFD term's own gradient is w * a unit vector per sample, so non-zero
    assert torch.allclose((g_mfd / w.view(-1, 1, 1, 1)).flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    mfd_part = g_mixed - g_pixel
    assert mfd_part.flatten(1).norm(dim=1).min() > 0.1
    assert torch.allclose(mfd_part, 2.0 * ramp * g_mfd, atol=1e-5)
