"""The gradient noise scale: the estimator the step uses recovers a known
B_simple, and splitting a step into micro-batches to measure it leaves the update unchanged.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ayt.diagnostics import validate_diagnostics
from ayt.errors import ConfigError
from ayt.method.ema import EMA
from ayt.method.losses import LOSSES
from ayt.method.schedule import ConsistencySchedule, PairNoise
from ayt.networks.precond import EDMPrecond
from ayt.training.noise_scale import (GRAD_SQ_NORM, GRAD_TRACE_COV, NOISE_SCALE, MicroBatchGradients, NoiseScale,
                                      squared_norm, unbiased_estimates)
from ayt.training.step import ConsistencyStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unbiased_estimates_invert_the_two_batch_size_model():
    """Mutation caught: swapping b_small and b_big (or a sign) in `unbiased_estimates`."""
    g2, trace, b_small, b_big = 3.0, 120.0, 8.0, 64.0
    small, big = torch.tensor(g2 + trace / b_small), torch.tensor(g2 + trace / b_big)
    est_g2, est_trace = unbiased_estimates(small, big, b_small, b_big)
    assert math.isclose(est_g2.item(), g2, rel_tol=1e-6) and math.isclose(est_trace.item(), trace, rel_tol=1e-6)


def test_linear_regression_noise_scale_matches_the_closed_form():
    """Per-sample loss ½(xᵀw − y)² with x ~ N(0, I_d), y = xᵀw* + ε, ε ~ N(0, σ²), at w = w* + δ:
    g = x(xᵀδ − ε), so G = δ and Σ = |δ|²I + δδᵀ + σ²I, i.e. |G|² = |δ|², tr(Σ) = (d+1)|δ|² + dσ².
    The gradients go through the step's machinery (micro-batch losses divided by k, backward,
    `MicroBatchGradients`, `NoiseScale`); tolerance 10% on the EMA over 400 draws.
    Mutations caught: a missing k² in `observe` (B_small's norms k² too small), not
    subtracting the previous accumulated gradient, b_small/b_big swapped."""
    d, sigma, batch, chunks = 10, 1.0, 64, 4
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=gen)
    delta /= delta.norm()
    w_star = torch.randn(d, generator=gen)
    w = torch.nn.Parameter(w_star + delta)
    expected_g2, expected_trace = 1.0, (d + 1) * 1.0 + d * sigma ** 2
    noise_scale = NoiseScale(micro_batches=chunks, ema=0.999)
    for _ in range(400):
        x = torch.randn(batch, d, generator=gen)
        y = x @ w_star + sigma * torch.randn(batch, generator=gen)
        w.grad = None
        grads = MicroBatchGradients([w], chunks)
        for i, (xc, yc) in enumerate(zip(x.chunk(chunks), y.chunk(chunks))):
            (0.5 * (xc @ w - yc).square().mean() / chunks).backward()
            grads.observe(keep=i + 1 < chunks)
        noise_scale.update(grads.small_sq(), squared_norm(grads.grads()), batch // chunks, batch)
    values = noise_scale.values()
    assert values[GRAD_SQ_NORM] == pytest.approx(expected_g2, rel=0.10)
    assert values[GRAD_TRACE_COV] == pytest.approx(expected_trace, rel=0.10)
    assert values[NOISE_SCALE] == pytest.approx(expected_trace / expected_g2, rel=0.10)


def _net() -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(8, 1, sigma_min=0.002, sigma_data=0.5, model_channels=8, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(), dropout=0.0).train()


def _step(net, noise_scale: NoiseScale | None) -> ConsistencyStep:
    """Plain SGD: the update is lr × gradient, so a mis-scaled gradient shows (Adam would
    normalise it away, and amplify rounding in near-zero gradients)."""
    return ConsistencyStep(net=net, loss=LOSSES["pseudo_huber"](), schedule=ConsistencySchedule(),
                           noise=PairNoise(7, torch.device("cpu")), optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           ema=EMA(net, 0.9), global_batch=8, hooks=(noise_scale,) if noise_scale else ())


def test_noise_scale_micro_batching_gives_the_same_update():
    """Mutations caught: dividing micro-batch losses by anything but the number of chunks used,
    or the snapshot (a clone) aliasing and modifying `.grad`. The diagnostic changes the
    step's arithmetic only by float rounding; it also measures something finite."""
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain, split = _net(), _net()
    noise_scale = NoiseScale(micro_batches=4, ema=0.9)
    step_plain, step_split = _step(plain, None), _step(split, noise_scale)
    assert step_split.chunks == 4 and step_plain.chunks == 1
    out_plain, out_split = step_plain(x, 3), step_split(x, 3)
    assert torch.allclose(out_split["loss"], out_plain["loss"], rtol=1e-5)
    g_plain = torch.cat([p.grad.flatten() for p in plain.parameters()])
    g_split = torch.cat([p.grad.flatten() for p in split.parameters()])
    assert g_plain.abs().max() > 0
    assert torch.allclose(g_split, g_plain, rtol=1e-4, atol=1e-6 * g_plain.abs().max().item())
    for a, b in zip(plain.parameters(), split.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    values = noise_scale.values()
    assert noise_scale.updates == 1
    assert all(math.isfinite(values[k]) for k in (GRAD_SQ_NORM, GRAD_TRACE_COV))
    assert values[GRAD_TRACE_COV] > 0


def test_config_rejects_micro_batches_that_do_not_divide_the_worker_batch():
    """Mutation caught: dropping the divisibility check (x.chunk would make unequal micro-batches)."""
    def cfg(batch, micro, workers=1, enabled=True):
        return OmegaConf.create({"batch_size": batch, "scaling": {"num_workers": workers},
                                 "diagnostics": {"noise_scale": {"enabled": enabled, "micro_batches": micro, "ema": 0.9}}})
    validate_diagnostics(cfg(32, 2))
    validate_diagnostics(cfg(9, 2, enabled=False))
    with pytest.raises(ConfigError, match="micro_batches"):
        validate_diagnostics(cfg(9, 2))
    with pytest.raises(ConfigError, match="micro_batches"):
        validate_diagnostics(cfg(32, 4, workers=16))       # 2 images per worker
    with pytest.raises(ConfigError, match="micro_batches"):
        validate_diagnostics(cfg(32, 1))
