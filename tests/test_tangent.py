"""Tangent diagnostics (`ayt.eval.tangent`): the cosine of a loss's output gradient with the
pixel error on a fixed probe set, per t-bin, and its oscillation between evaluations; the
config checks; the report figure."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ayt.config import compose_config, load_config
from ayt.data import load_dataset
from ayt.errors import ConfigError
from ayt.eval.tangent import COS, ERR, OSC, PREFIX, TangentProbe, metric_key
from ayt.method.ema import EMA
from ayt.method.losses import L1, ManifoldFeatureDistance, PseudoHuber
from ayt.method.schedule import ConsistencySchedule, PairNoise
from ayt.networks.feature_map import FeatureMap
from ayt.networks.precond import build_denoiser
from ayt.training.step import ConsistencyStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    cfg = compose_config(["experiment=smoke", "diagnostics.tangent.probe_size=32"])
    data = load_dataset(cfg.dataset, train=True)
    torch.manual_seed(0)
    net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels)
    net.train()
    return SimpleNamespace(cfg=cfg, data=data, net=net, schedule=ConsistencySchedule.from_config(cfg.schedule, cfg.edm))


def _probe(s) -> TangentProbe:
    return TangentProbe.from_config(s.cfg, s.data, CPU)


def _values(metrics: dict[str, float], kind: str, bins: int) -> list[float]:
    return [metrics[metric_key(kind, b)] for b in range(bins)]


def _feature_map(data, seed: int) -> FeatureMap:
    torch.manual_seed(seed)
    return FeatureMap(data.channels, data.resolution, [8, 8, 8, 8], num_labels=4).freeze()


def test_pseudo_huber_with_c_zero_pulls_exactly_along_the_pixel_error(setup):
    """|pred − target| has gradient −e/|e|: cosine 1 in every bin. Mutations caught: the
    direction taken as +grad (cosine −1), the error taken against x instead of the target."""
    probe = _probe(setup)
    bins = setup.cfg.diagnostics.tangent.t_bins
    metrics = probe.measure(setup.net, PseudoHuber(0.0), setup.schedule, 40)
    assert probe.probes.t_bins == bins >= 4
    for value in _values(metrics, COS, bins) + [metrics[metric_key(COS)]]:
        assert abs(value - 1.0) < 1e-5
    assert all(e > 0 for e in _values(metrics, ERR, bins))
    assert _values(metrics, "dist", bins) == pytest.approx(_values(metrics, ERR, bins), rel=1e-5)  # |e| is its distance
    assert not any(k.startswith(PREFIX + OSC) for k in metrics)       # no previous evaluation yet
    assert setup.net.training                                          # train mode restored
    # L1 turns the step off the error (sign(e) is not e): the cosine can tell losses apart.
    assert max(_values(probe.measure(setup.net, L1(), setup.schedule, 40), COS, bins)) < 0.99


def test_pairs_and_targets_are_the_training_steps_at_that_iteration(setup):
    """The error norm equals training's own pseudo-Huber(c=0) term (`consistency_terms`) on the
    probe pairs at that iteration, r(t) following the curriculum stage. Mutations caught: the
    target taken as x (r = 0 everywhere), the stage of iteration 0 used at every evaluation."""
    import contextlib
    from dataclasses import replace

    from ayt.eval.tangent import bin_means
    from ayt.training.step import consistency_terms
    schedule = replace(setup.schedule, iterations_per_stage=10, q=2.0)
    probe = _probe(setup)
    p, bins = probe.probes, probe.probes.t_bins
    setup.net.eval()
    try:
        for iteration in (5, 45):
            pair = schedule.pair(p.x, p.n, p.eps, iteration)
            with torch.no_grad():
                ref = consistency_terms(setup.net, PseudoHuber(0.0), pair, iteration, schedule.sigma_min,
                                        contextlib.nullcontext())["loss"]
            expected = bin_means(ref, p.bins, bins).tolist()
            setup.net.train()
            got = _values(probe.measure(setup.net, PseudoHuber(0.0), schedule, iteration), ERR, bins)
            setup.net.eval()
            assert got == pytest.approx(expected, rel=1e-5), iteration
    finally:
        setup.net.train()
    early = _values(probe.measure(setup.net, PseudoHuber(0.0), schedule, 5), ERR, bins)
    assert early != pytest.approx(_values(probe.measure(setup.net, PseudoHuber(0.0), schedule, 45), ERR, bins),
                                  rel=1e-3)


def test_mfd_cosine_is_below_one_and_moves_with_the_feature_map(setup):
    probe = _probe(setup)
    bins = probe.probes.t_bins
    first = probe.measure(setup.net, ManifoldFeatureDistance(_feature_map(setup.data, 1)), setup.schedule, 40)
    second = probe.measure(setup.net, ManifoldFeatureDistance(_feature_map(setup.data, 2)), setup.schedule, 40)
    a, b = _values(first, COS, bins), _values(second, COS, bins)
    assert all(-1 <= v < 0.99 for v in a + b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3, (a, b)
    assert _values(first, ERR, bins) == _values(second, ERR, bins)     # same net, same probes: same error


def test_probe_set_is_the_same_for_every_loss_and_changes_with_the_seed(setup):
    def probes(*overrides):
        cfg = compose_config(["experiment=smoke", *overrides])
        return TangentProbe.from_config(cfg, load_dataset(cfg.dataset, train=True), CPU).probes

    mfd, huber, other = probes("loss=mfd"), probes("loss=pseudo_huber", "loss.huber_c=0.1"), probes("seed=1")
    for field in ("x", "n", "eps", "bins", "indices"):
        assert torch.equal(getattr(mfd, field), getattr(huber, field)), field
    assert mfd.edges == huber.edges
    assert not torch.equal(mfd.indices, other.indices) and not torch.equal(mfd.eps, other.eps)
    assert torch.equal(mfd.n, other.n)                                 # t values are deterministic
    assert len(set(mfd.indices.tolist())) == len(mfd.indices) == 64    # distinct training images
    assert torch.bincount(mfd.bins).tolist() == [16, 16, 16, 16]
    t = setup.schedule.sample_t(mfd.n)
    for b in range(4):                                                 # each bin's t lies inside its edges
        inside = t[mfd.bins == b]
        assert mfd.edges[b] <= float(inside.min()) and float(inside.max()) <= mfd.edges[b + 1]
    assert mfd.edges[0] == setup.cfg.edm.sigma_min and mfd.edges[-1] == setup.cfg.edm.sigma_max


def test_oscillation_appears_at_the_second_evaluation_and_is_one_without_a_change(setup):
    cfg, data = setup.cfg, setup.data
    torch.manual_seed(3)
    net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels)
    net.train()
    step = ConsistencyStep(net=net, loss=PseudoHuber(0.0), schedule=setup.schedule, noise=PairNoise(0, CPU),
                           optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), ema=EMA(net, 0.9), global_batch=8)
    probe = _probe(setup)
    bins = probe.probes.t_bins
    rng = torch.get_rng_state()
    first = probe(step, 10)
    assert torch.equal(rng, torch.get_rng_state())          # no global RNG draw: training is unchanged by it
    assert net.training and not any(k.startswith(PREFIX + OSC) for k in first)
    same = probe(step, 10)
    assert all(abs(v - 1.0) < 1e-5 for v in _values(same, OSC, bins) + [same[metric_key(OSC)]])
    step(data.images[:8], 10)                                 # one optimizer step moves the prediction
    moved = probe(step, 11)
    assert min(_values(moved, OSC, bins)) < 1 - 1e-4, moved
    assert all(math.isfinite(v) for v in moved.values())


@pytest.mark.parametrize("overrides, field, words", [
    (["diagnostics.tangent.t_bins=0"], "diagnostics.tangent.t_bins", ">= 1"),
    (["diagnostics.tangent.probe_size=3"], "diagnostics.tangent.probe_size", "t_bins"),
    (["diagnostics.tangent.enabled=maybe"], "diagnostics.tangent.enabled", "true or false"),
    (["diagnostics.tangent.probe_size=1.5"], "diagnostics.tangent.probe_size", "integer"),
])
def test_bad_tangent_config_names_the_field(tmp_path, overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides + [f"out_dir={tmp_path}"])
    assert info.value.field == field and words in str(info.value)


def test_switched_off_builds_no_probe(setup):
    cfg = compose_config(["experiment=smoke", "diagnostics.tangent.enabled=false"])
    assert TangentProbe.from_config(cfg, setup.data, CPU) is None


def test_report_draws_the_tangent_figure_from_trial_curves(tmp_path, setup):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ayt.studies.report.write import Trial
    from ayt.studies.report.tangent import tangent_files

    def trial(loss, seed, with_tangent=True):
        curves = {"eval/fid_1step": [(50, 100.0), (100, 90.0)]}
        if with_tangent:
            for b in range(4):
                curves[metric_key(COS, b)] = [(50, 0.5 + 0.1 * seed), (100, 0.6)]
                curves[metric_key(ERR, b)] = [(50, 0.2), (100, 0.1)]
                curves[metric_key(OSC, b)] = [(100, 0.9)]
        return Trial(f"{loss}{seed}", f"{loss}-{seed}", {"loss": loss, "seed": str(seed)}, 32, "FINISHED", False,
                     curves)

    plan = SimpleNamespace(name="demo", base=setup.cfg)
    trials = [trial(loss, s) for loss in ("mfd", "pseudo_huber") for s in range(2)]
    files = tangent_files(trials, tmp_path, plan, plt, {})
    assert [f.rsplit("/", 1)[-1] for f in files] == ["tangent.png", "tangent.csv"]
    assert (tmp_path / "tangent.png").stat().st_size > 0
    lines = (tmp_path / "tangent.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 2 and "cos_t0" in lines[0] and "osc_t3" in lines[0]
    assert tangent_files([trial("mfd", 0, with_tangent=False)], tmp_path / "none", plan, plt, {}) == []


def test_a_checkpoint_keeps_the_oscillation_and_the_noise_scale_average(setup, tmp_path):
    """A resumed run's first evaluation has its oscillation (the directions of the evaluation
    before the checkpoint) and its noise-scale average continues (same value as a run that never
    stopped). Mutations caught: either state left out of save_checkpoint or load_checkpoint."""
    import copy

    from ayt.diagnostics import Diagnostics
    from ayt.training.loop import RunState, WorkerContext, load_checkpoint, save_checkpoint
    from ayt.training.noise_scale import NoiseScale

    def build(net):
        noise_scale = NoiseScale(micro_batches=2, ema=0.9)
        step = ConsistencyStep(net=net, loss=PseudoHuber(0.0), schedule=setup.schedule, noise=PairNoise(0, CPU),
                               optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), ema=EMA(net, 0.9),
                               global_batch=8, hooks=(noise_scale,))
        return step, noise_scale

    (step, noise_scale), probe = build(copy.deepcopy(setup.net)), _probe(setup)
    x = setup.data.images[:8]
    for it in range(3):
        step(x, it)
    probe(step, 3)
    ctx = WorkerContext(CPU)
    save_checkpoint(tmp_path, step, RunState(iteration=3), ctx, diagnostics=Diagnostics([noise_scale, probe]))
    (resumed, resumed_noise), resumed_probe = build(copy.deepcopy(setup.net)), _probe(setup)
    assert resumed_probe.previous is None and resumed_noise.average is None
    assert load_checkpoint(tmp_path, resumed, ctx, Diagnostics([resumed_noise, resumed_probe])).iteration == 3
    assert torch.equal(resumed_probe.previous, probe.previous)
    assert resumed_noise.updates == noise_scale.updates == 3
    assert resumed_noise.values() == noise_scale.values()
    assert metric_key(OSC) in resumed_probe(resumed, 3)
