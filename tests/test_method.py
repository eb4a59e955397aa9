"""The method's formulas (ALGORITHM §3-4) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ayt.method.ema import EMA
from ayt.method.losses import LOSSES, ManifoldFeatureDistance, PseudoHuber, build_loss, LossResources
from ayt.method.schedule import ConsistencyPair, ConsistencySchedule, PairNoise, lr_scale
from ayt.networks.feature_map import FeatureMap
from ayt.training.loop import accumulation_steps
from ayt.training.step import consistency_terms

AYT = ConsistencySchedule(q=256.0, k=8.0, b=1.0, iterations_per_stage=None)
ECT = ConsistencySchedule(q=2.0, k=8.0, b=1.0, iterations_per_stage=25000)


@pytest.mark.parametrize("schedule, stage, t, expected", [
    # r = t (1 - q^-(s+1) (1 + k sigmoid(-b t))); sigmoid(-1) = 0.2689414, sigmoid(-10) = 4.5398e-5
    (AYT, 0, 1.0, 0.9876893),     # 1 - 3.1515313/256
    (AYT, 0, 10.0, 9.9609233),    # 10 (1 - 1.0003632/256)
    (ECT, 0, 1.0, 0.0),           # 1 - 3.1515313/2 < 0 -> clamped to 0
    (ECT, 0, 10.0, 4.9981842),    # 10 (1 - 1.0003632/2)
    (ECT, 1, 10.0, 7.4990921),    # 10 (1 - 1.0003632/4)
])
def test_r_of_t_matches_hand_computed_values(schedule, stage, t, expected):
    r = schedule.r_of_t(torch.tensor([t], dtype=torch.float64), stage)
    assert r.item() == pytest.approx(expected, abs=1e-6)


def test_ect_stage_advances_and_ayt_has_one_stage():
    assert ECT.stage(24_999) == 0 and ECT.stage(25_000) == 1 and ECT.stage(75_000) == 3
    assert AYT.stage(10**7) == 0


def test_pair_shares_eps_and_weight_is_inverse_gap():
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    pair = AYT.pair(x, torch.zeros(4), eps, 0)
    t = math.exp(-1.1)
    assert torch.allclose(pair.t, torch.full((4,), t))
    assert torch.allclose((pair.x_t - x) / pair.t.view(-1, 1, 1, 1), eps, atol=1e-5)
    assert torch.allclose((pair.x_r - x) / pair.r.view(-1, 1, 1, 1), eps, atol=1e-5)
    assert torch.allclose(pair.weight, 1 / (pair.t - pair.r))


def test_pair_noise_slices_are_worker_count_invariant():
    noise = PairNoise(seed=3, device=torch.device("cpu"))
    n_all, eps_all = noise.draw(7, 8, (1, 4, 4))
    for rank in range(2):
        n, eps = noise.draw(7, 8, (1, 4, 4), rank=rank, world_size=2)
        assert torch.equal(n, n_all[rank::2]) and torch.equal(eps, eps_all[rank::2])
    assert not torch.equal(noise.draw(8, 8, (1, 4, 4))[1], eps_all)


def test_pseudo_huber_c0_is_the_norm_and_c_positive_matches_formula():
    pred, target = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    norm = (pred - target).flatten(1).norm(dim=1)
    assert torch.allclose(PseudoHuber(0.0)(pred, target, 0)["loss"], norm, atol=1e-6)
    c = 0.00054 * math.sqrt(16)
    expected = torch.sqrt(norm**2 + c**2) - c
    assert torch.allclose(PseudoHuber(0.00054)(pred, target, 0)["loss"], expected, atol=1e-6)


def test_l2_l1_values():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert torch.equal(LOSSES["l2"]()(pred * 2, target, 0)["loss"], torch.full((2,), 16.0))
    assert torch.equal(LOSSES["l1"]()(pred * 2, target, 0)["loss"], torch.full((2,), 8.0))


def _feature_map():
    torch.manual_seed(0)
    fm = FeatureMap(1, 8, [4, 8, 8], num_labels=3)
    fm.eval()
    with torch.no_grad():              # non-trivial BatchNorm statistics
        for m in fm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return fm.freeze()


def test_mfd_gradient_is_weighted_unit_direction_and_feature_map_gets_no_grads():
    fm = _feature_map()
    mfd = ManifoldFeatureDistance(fm)
    pred = torch.randn(5, 1, 8, 8, requires_grad=True)
    target = torch.randn(5, 1, 8, 8)
    w = torch.rand(5) + 0.5
    terms = mfd(pred, target, 0)
    (w * terms["loss"]).sum().backward()
    g = pred.grad / w.view(-1, 1, 1, 1)
    assert torch.allclose(g.flatten(1).norm(dim=1), torch.ones(5), atol=1e-5)
    # the direction is the feature-distance gradient, normalised
    a = pred.detach().requires_grad_(True)
    from ayt.method.losses import manifold_feature_distance
    (raw,) = torch.autograd.grad(manifold_feature_distance(fm, a, target).sum(), a)
    assert torch.allclose(g, raw / raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in fm.parameters())
    assert (terms["dist"] > 0).all()


def test_mixed_loss_ramps_the_mfd_term():
    fm = _feature_map()
    cfg = {"name": "mixed", "pixel": "pseudo_huber", "huber_c": 0.0, "lam": 2.0, "n_ramp": 10, "eps": 1e-5}
    from omegaconf import OmegaConf
    loss = build_loss(OmegaConf.create(cfg), LossResources(feature_map=lambda: fm))
    pred, target = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    pixel = (pred - target).flatten(1).norm(dim=1)
    # the normalised-gradient term's value is 1/2 |g_hat|^2 = 1/2 per sample
    for it, ramp in ((0, 0.1), (4, 0.5), (50, 1.0)):
        assert torch.allclose(loss(pred, target, it)["loss"], pixel + 2.0 * ramp * 0.5, atol=1e-5)


class _DropoutDenoiser(nn.Module):
    """D(x, sigma) whose output depends on a dropout mask and on sigma."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, sigma):
        return self.drop(x) * sigma.view(-1, 1, 1, 1)


def test_target_and_prediction_share_the_dropout_mask():
    net = _DropoutDenoiser().train()
    x = torch.randn(6, 1, 8, 8)
    t = torch.full((6,), 0.7)
    pair = ConsistencyPair(x=x, t=t, r=t.clone(), x_t=x, x_r=x)   # identical passes
    terms = consistency_terms(net, PseudoHuber(0.0), pair, 0, 0.002, torch.autocast("cpu", enabled=False))
    assert torch.equal(terms["loss"], torch.zeros(6))
    # without replaying the RNG the two masks differ, so the check above can fail
    assert not torch.equal(net(x, t), net(x, t))


def test_target_is_x_where_r_is_zero():
    net = _DropoutDenoiser().eval()
    x = torch.randn(2, 1, 4, 4)
    t = torch.tensor([1.0, 1.0])
    pair = ConsistencyPair(x=x, t=t, r=torch.tensor([0.0, 0.5]), x_t=x, x_r=x)
    terms = consistency_terms(net, PseudoHuber(0.0), pair, 0, 0.002, torch.autocast("cpu", enabled=False))
    expected = torch.stack([(x[0] - x[0]).norm(), (x[1] - 0.5 * x[1]).norm()])
    assert torch.allclose(terms["loss"], expected, atol=1e-6)


def test_ema_halflife_in_images_and_update():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, halflife_kimg=1.0)
    assert ema.beta(1000) == pytest.approx(0.5)
    assert ema.beta(500) == pytest.approx(math.sqrt(0.5))
    fixed = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = fixed.model.weight.clone()
    fixed.update(net, 128)
    assert torch.allclose(fixed.model.weight, 0.9 * before + 0.1 * net.weight)


def test_accumulation_and_lr_scaling():
    assert accumulation_steps(64, None) == 1
    assert accumulation_steps(64, 16) == 4
    assert accumulation_steps(48, 20) == 3      # 3 x 16
    assert accumulation_steps(7, 3) == 7        # prime: one image per micro-batch
    assert lr_scale("none", 32, 128) == 1.0
    assert lr_scale("linear", 32, 128) == 0.25
    assert lr_scale("sqrt", 32, 128) == 0.5
