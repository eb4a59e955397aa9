"""bf16 measured for this method (`python -m ayt.bench numerics`, ayt/bench/numerics.py): the
measurement on cifar10_paper's own network, the TF32 emulation it uses off a GPU, the verdict
rule, and the paper preset's precision following the committed record.

Mutations caught: the bench measuring without the policy's autocast (bf16 equal to fp32 on the
paper network); the TF32 emulation not rounding (or rounding the wrong bits: ties not to
even); the verdict reading the best bin or one weight setting only; cifar10_paper's
`precision` or the README's figure edited without rerunning the record (or the record
regenerated without changing them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ayt.bench.numerics import (PRESET, THRESHOLD, TF32Emulation, loss_for, measure, per_bin_cosines, preset_choice,
                                round_to_tf32, smooth_images, verdict)
from ayt.config import compose_config
from ayt.eval.tangent import build_probe_set
from ayt.method.schedule import ConsistencySchedule
from ayt.networks.precond import build_denoiser
from ayt.precision import effective_settings

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_to_even():
    one = 1.0
    x = torch.tensor([one + 2 ** -11, one + 3 * 2 ** -11, one + 2 ** -10, -(one + 3 * 2 ** -11), one + 2 ** -12])
    assert round_to_tf32(x).tolist() == [one, one + 2 ** -9, one + 2 ** -10, -(one + 2 ** -9), one]
    assert round_to_tf32(torch.tensor([3], dtype=torch.int64)).dtype == torch.int64     # non-floats pass through


def test_tf32_emulation_computes_products_of_rounded_inputs_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with TF32Emulation():
        y = conv(x)
    expected = F.conv2d(round_to_tf32(x.detach()), round_to_tf32(conv.weight.detach()), None, 1, 1)
    assert torch.equal(y.detach(), expected + conv.bias.detach().view(1, -1, 1, 1))
    assert not torch.equal(y.detach(), conv(x).detach())      # fp32 differs: something was rounded
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def paper_network():
    """cifar10_paper's DDPM++ (55.7M parameters, random init), 4 probe pairs (one per t-bin)."""
    cfg = compose_config(PRESET)
    schedule = ConsistencySchedule.from_config(cfg.schedule, cfg.edm)
    images = smooth_images(4, 3, 32, torch.Generator().manual_seed(0))
    probes = build_probe_set(images, 0, 4, 4, schedule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_denoiser(cfg.network, cfg.edm, 32, 3).eval().requires_grad_(False)
        losses = {"pseudo_huber": loss_for("pseudo_huber", cfg, 3, 32)}
    return net, schedule, schedule.pair(probes.x, probes.n, probes.eps, 0), losses, probes


def test_the_measurement_on_the_paper_network_compares_each_precision_with_fp32(paper_network):
    net, schedule, pair, losses, probes = paper_network
    assert sum(p.numel() for p in net.parameters()) == 55_732_739      # the preset's DDPM++, as EDM's
    before = effective_settings("fp32")
    ref = measure(net, pair, schedule, losses, "fp32", torch.device("cpu"))
    again = per_bin_cosines(measure(net, pair, schedule, losses, "fp32", torch.device("cpu")), ref, probes.bins, 4)
    assert all(b["min"] == pytest.approx(1.0, abs=1e-12) for q in again.values() for b in q["cosine"])
    bf16 = measure(net, pair, schedule, losses, "bf16", torch.device("cpu"))
    assert effective_settings("fp32") == before                # the policy's flags are restored
    cos = per_bin_cosines(bf16, ref, probes.bins, 4)
    assert set(cos) == {"delta", "branch", "grad_pseudo_huber"} and all(len(q["cosine"]) == 4 for q in cos.values())
    # bf16 autocast really ran: the network's own term differs from fp32's in every bin
    assert all(b["mean"] > 0 for b in cos["branch"]["relative_error"])
    # pseudo-Huber at c = 0 sends the normalised difference: its cosine is delta's
    for a, b in zip(cos["delta"]["cosine"], cos["grad_pseudo_huber"]["cosine"]):
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-6)


def _results(means: dict[str, dict[str, list[float]]]) -> dict:
    return {setting: {"bf16": {q: {"cosine": [{"mean": m, "min": m} for m in bins]} for q, bins in qs.items()}}
            for setting, qs in means.items()}


def test_verdict_is_the_worst_bin_of_every_setting_and_training_quantity():
    good = [0.999, 0.9995]
    results = _results({"own": {"delta": good, "grad_mfd": good, "branch": [0.1, 0.1]},
                        "full_scale": {"delta": good, "grad_mfd": [0.9999, THRESHOLD - 1e-3]}})
    v = verdict(results, "bf16")
    assert not v["keeps_direction"]
    assert v["worst"] == {"value": THRESHOLD - 1e-3, "quantity": "grad_mfd", "setting": "full_scale", "bin": 1}
    results["full_scale"]["bf16"]["grad_mfd"]["cosine"][1]["mean"] = THRESHOLD
    assert verdict(results, "bf16")["keeps_direction"]          # the branch alone does not decide


def _numerics_record() -> dict:
    records = json.loads((REPO / "studies" / "benchmarks" / "results.json").read_text())
    return next(r for r in records if r["benchmark"] == "numerics")


def test_cifar10_paper_precision_follows_the_committed_record():
    record = _numerics_record()
    assert not record["config"]["quick"] and "random" in record["config"]["weights"]["own"]
    assert "DDPM++" in record["config"]["network"] and "55.73M" in record["config"]["network"]
    assert set(record["verdicts"]) == {"bf16", "tf32"}
    assert record["precision_for_cifar10_paper"] == preset_choice(record["verdicts"])
    assert compose_config(["experiment=cifar10_paper"]).precision == record["precision_for_cifar10_paper"]
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Paper-scale runs on GPUs", 1)[1].split("\n## ", 1)[0]
    docs = (REPO / "docs" / "gpu.md").read_text()
    for text in (section, docs):
        for verdict_ in record["verdicts"].values():             # each worst figure, as the record has it
            assert f"{verdict_['worst']['value']:.3f}" in text
        assert f"≥ {THRESHOLD}" in text
        assert re.search(rf"`precision: {record['precision_for_cifar10_paper']}`", text)
    assert record["git"]["commit"][:7] in docs and not record["git"]["dirty"]


def test_the_preset_takes_the_fastest_precision_that_keeps_the_direction():
    def v(bf16, tf32):
        return {"bf16": {"keeps_direction": bf16}, "tf32": {"keeps_direction": tf32}}
    assert preset_choice(v(True, True)) == "bf16"
    assert preset_choice(v(False, True)) == "tf32"
    assert preset_choice(v(False, False)) == "fp32"
