"""ayt.bench: the MFD equivalence it asserts, the host-sync scan, and the records it writes.
Tiny sizes only; no Ray."""

from __future__ import annotations

import json

import pytest
import torch

from ayt import bench

CPU = torch.device("cpu")
# 8x8 images: a 3-stage feature map, a one-level U-Net; seconds on one core.
TINY = bench.Preset("tiny", 8, 1, 3, ("network=cpu", "network.channel_mult=[1]", "network.model_channels=8",
                                      "network.attn_resolutions=[]", "feature_map.channels=[4,8,8]"), "tiny")


def test_naive_and_optimised_mfd_send_the_same_gradient_into_the_prediction():
    result = bench.mfd_gradients(TINY, CPU, seed=0)
    opt, naive = result["optimised"], result["naive"]
    assert result["allclose"]
    torch.testing.assert_close(opt, naive, rtol=bench.MFD_RTOL, atol=bench.MFD_ATOL)
    # The normalised-gradient form: a unit-norm direction per sample.
    torch.testing.assert_close(opt.flatten(1).norm(dim=1), torch.ones(TINY.batch))


def test_mfd_equivalence_check_detects_a_different_feature_map():
    """The control: the same comparison with other feature-map weights must fail."""
    optimised, naive_fm, pred, target = bench.mfd_pair(TINY, CPU, seed=0)
    with torch.no_grad():
        for p in naive_fm.parameters():
            p.mul_(1.1)
    g_opt = bench.gradient_wrt_prediction(lambda p: optimised(p, target, 0), pred)
    g_naive = bench.gradient_wrt_prediction(lambda p: bench.naive_mfd_terms(naive_fm, p, target), pred)
    assert not torch.allclose(g_opt, g_naive, rtol=bench.MFD_RTOL, atol=bench.MFD_ATOL)


def test_step_has_no_host_device_sync_and_the_scan_finds_one(tmp_path):
    step, cfg = bench.build_step(TINY, ["loss=mfd"], CPU, tmp_path)
    x = bench.random_batch(TINY, cfg, CPU)
    scan = bench.scan_host_syncs(step, x)
    assert scan["device_syncs"] == 0, scan["device_sync_ops"]
    assert scan["optimizer_step_counter_reads"] > 0          # it does see scalar reads

    loss = step.loss

    def reads_a_value(pred, target, iteration):
        terms = loss(pred, target, iteration)
        float(terms["loss"].detach().mean())                 # a .item(): a sync point on a GPU
        return terms

    step.loss = reads_a_value
    scan = bench.scan_host_syncs(step, x)
    assert scan["device_syncs"] == 1
    (site,) = scan["device_sync_ops"]
    assert "_local_scalar_dense" in site and "tests/test_bench.py" not in site


def test_summarize_median_iqr_min_max():
    stats = bench.summarize([3.0, 1.0, 2.0, 4.0])
    assert stats["median_s"] == 2.5 and stats["iqr_s"] == pytest.approx(1.5)
    assert (stats["min_s"], stats["max_s"], stats["repeats"]) == (1.0, 4.0, 4)


def test_cli_prints_and_writes_records_with_machine_torch_config_and_spread(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert bench.main(["mfd", "--quick", "--repeats", "2", "--warmup", "0", "--threads", "1",
                       "--out", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == [record]
    assert record["benchmark"] == "mfd"
    machine = record["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert record["torch"]["version"] == torch.__version__ and record["torch"]["threads"] == 1
    assert record["config"]["tolerance"] == {"rtol": bench.MFD_RTOL, "atol": bench.MFD_ATOL}
    for preset in ("cpu", "cifar_small"):
        result = record["results"][preset]
        assert result["gradients_equal"] is True
        for variant in ("optimised", "naive"):
            stats = result[variant]
            assert stats["repeats"] == 2 and len(stats["times_s"]) == 2
            assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["iqr_s"] >= 0
        assert result["speedup"] > 0
    target = record["targets"]["optimised_mfd_speedup_cpu"]
    assert isinstance(target["met"], bool) and target["value"] == record["results"]["cpu"]["speedup"]

    listed = tmp_path / "results.json"
    bench.write_records([record, record], listed)
    assert json.loads(listed.read_text()) == [record, record]
