"""ayt.bench: the MFD equivalence it asserts, the host-sync scan, the harness (global state
restored, commit and threads recorded, relative paths only), the records it writes, the
front-door arithmetic and the README table generated from the records. Tiny sizes only; no Ray.

Each test that guards against a specific breakage names it ("Mutation: ...") in its
docstring; each was seen failing once with that mutation applied by hand."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ayt.bench as bench
from ayt.bench import Options, harness, table
from ayt.bench.__main__ import main
from ayt.bench.front_door import summarize_front_door, trial_times
from ayt.bench.mfd import check_gradients, mfd_pair
from ayt.bench.presets import Preset, build_step, random_batch
from ayt.training.probes import (MFD_ATOL, MFD_RTOL, gradient_wrt_prediction, naive_mfd_terms,
                                 scan_host_syncs)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# 8x8 images: a 3-stage feature map, a one-level U-Net; seconds on one core.
TINY = Preset("tiny", 8, 1, 3, ("network=cpu", "network.channel_mult=[1]", "network.model_channels=8",
                                "network.attn_resolutions=[]", "feature_map.channels=[4,8,8]"), "tiny")
# An absolute path in a string: a '/' at the start or after a separator, followed by a name.
ABSOLUTE = re.compile(r"(?:^|[\s=:'\"(\[,])/[^\s/]")


def strings(value):
    """Every string (keys included) anywhere in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def absolute_paths(record, *roots) -> list[str]:
    roots = [str(r) for r in roots] + [tempfile.gettempdir(), str(REPO), str(Path.home())]
    roots = [r for r in roots if len(r) > 1]
    return [s for s in strings(record) if ABSOLUTE.search(s) or any(r in s for r in roots)]


def check_target(entry: dict) -> None:
    """`met` must follow from the value and the bound, in the bound's direction."""
    op, bound = entry["target"].split()
    assert op in ("<=", ">=")
    assert entry["met"] is (entry["value"] <= float(bound) if op == "<=" else entry["value"] >= float(bound))


def test_naive_and_optimised_mfd_send_the_same_gradient_into_the_prediction():
    result = check_gradients(TINY, CPU, seed=0)
    opt, naive = result["optimised"], result["naive"]
    assert result["allclose"]
    torch.testing.assert_close(opt, naive, rtol=MFD_RTOL, atol=MFD_ATOL)
    # The normalised-gradient form: a unit-norm direction per sample.
    torch.testing.assert_close(opt.flatten(1).norm(dim=1), torch.ones(TINY.batch))


def test_mfd_equivalence_check_detects_a_different_feature_map():
    """The control: the same comparison with other feature-map weights must fail."""
    optimised, naive_fm, pred, target = mfd_pair(TINY, CPU, seed=0)
    with torch.no_grad():
        for p in naive_fm.parameters():
            p.mul_(1.1)
    g_opt = gradient_wrt_prediction(lambda p: optimised(p, target, 0), pred)
    g_naive = gradient_wrt_prediction(lambda p: naive_mfd_terms(naive_fm, p, target), pred)
    assert not torch.allclose(g_opt, g_naive, rtol=MFD_RTOL, atol=MFD_ATOL)


def test_step_has_no_host_device_sync_and_the_scan_finds_one(tmp_path):
    step, cfg = build_step(TINY, ["loss=mfd"], CPU, tmp_path)
    x = random_batch(TINY, cfg, CPU)
    scan = scan_host_syncs(step, x)
    assert scan["device_syncs"] == 0, scan["device_sync_ops"]
    assert scan["optimizer_step_counter_reads"] > 0          # it does see scalar reads

    loss = step.loss

    def reads_a_value(pred, target, iteration):
        terms = loss(pred, target, iteration)
        float(terms["loss"].detach().mean())                 # a .item(): a sync point on a GPU
        return terms

    step.loss = reads_a_value
    scan = scan_host_syncs(step, x)
    assert scan["device_syncs"] == 1
    (site,) = scan["device_sync_ops"]
    assert "_local_scalar_dense" in site and "tests/test_bench.py" not in site


def test_summarize_median_iqr_min_max():
    stats = harness.summarize([3.0, 1.0, 2.0, 4.0])
    assert stats["median_s"] == 2.5 and stats["iqr_s"] == pytest.approx(1.5)
    assert (stats["min_s"], stats["max_s"], stats["repeats"]) == (1.0, 4.0, 4)


def test_cli_prints_and_writes_records_with_machine_torch_config_and_spread(tmp_path, capsys):
    """Mutations: the speed-up computed the other way round (optimised / naive); `met`
    inverted or compared in the wrong direction; loadavg recorded as an unnamed list."""
    out = tmp_path / "results.jsonl"
    assert main(["mfd", "--quick", "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == [record]
    assert record["benchmark"] == "mfd"
    machine = record["machine"]
    assert machine["cpu_count"] >= 1
    for when in ("loadavg_start", "loadavg_end"):
        assert set(machine[when]) == {"1min", "5min", "15min"}
    assert record["torch"]["version"] == torch.__version__ and record["torch"]["threads"] == 1
    assert record["torch"]["threads_timed"] == [1]
    assert record["config"]["tolerance"] == {"rtol": MFD_RTOL, "atol": MFD_ATOL}
    for preset in ("cpu", "cifar_small"):
        result = record["results"][preset]
        assert result["gradients_equal"] is True
        for variant in ("optimised", "naive"):
            stats = result[variant]
            assert stats["repeats"] == 2 and len(stats["times_s"]) == 2
            assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["iqr_s"] >= 0
        # The direction: how many times longer the naive form takes than the optimised one.
        assert result["speedup"] == pytest.approx(result["naive"]["median_s"] / result["optimised"]["median_s"])
    entry = record["targets"]["optimised_mfd_speedup_cpu"]
    assert entry["value"] == record["results"]["cpu"]["speedup"] and entry["target"].startswith(">=")
    check_target(entry)
    assert not absolute_paths(record, tmp_path)

    listed = tmp_path / "results.json"
    bench.write_records([record, record], listed)
    assert json.loads(listed.read_text()) == [record, record]


def test_target_entries_follow_value_and_direction():
    """Mutation: `target()` comparing with the operator reversed, or `met` fixed to True."""
    assert harness.target(1.2, "<=", 1.5)["met"] is True
    assert harness.target(1.6, "<=", 1.5)["met"] is False
    assert harness.target(1.2, ">=", 1.3)["met"] is False
    assert harness.target(1.4, ">=", 1.3)["met"] is True
    for entry in (harness.target(v, op, 1.0) for v in (0.5, 1.0, 2.0) for op in ("<=", ">=")):
        check_target(entry)


def test_harness_restores_global_state_a_benchmark_changes(monkeypatch, tmp_path):
    """Mutation: `run_benchmark` without `preserved_state` (or without its thread restore):
    the ray benchmark's in-process trials call torch.set_num_threads(1) and every later
    benchmark of the run then ran on 1 thread."""
    monkeypatch.setenv("AYT_BENCH_KEEP", "kept")
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rng, py_rng, np_rng = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    cwd = os.getcwd()

    def meddles(opts):
        torch.set_num_threads(threads + 1)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        os.environ["AYT_BENCH_ADDED"] = "1"
        os.environ["AYT_BENCH_KEEP"] = "changed"
        del os.environ["AYT_BENCH_KEEP"]
        os.chdir(tmp_path)
        return {"results": {}}

    monkeypatch.setitem(bench.BENCHMARKS, "meddles", meddles)
    record = harness.run_benchmark("meddles", Options())
    assert record["torch"]["threads_end"] == threads + 1          # it did change them
    assert torch.get_num_threads() == threads
    assert torch.get_default_dtype() == dtype
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert random.getstate() == py_rng
    restored = np.random.get_state()
    assert restored[0] == np_rng[0] and np.array_equal(restored[1], np_rng[1]) and restored[2:] == np_rng[2:]
    assert "AYT_BENCH_ADDED" not in os.environ and os.environ["AYT_BENCH_KEEP"] == "kept"
    assert os.getcwd() == cwd


def test_record_holds_the_commit_and_the_threads_the_benchmark_ran_with(monkeypatch):
    """Mutations: the record without `git`; `torch.threads` read after the state is restored
    (the process's thread count, not the one the benchmark ran with)."""
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    seen = []
    monkeypatch.setitem(bench.BENCHMARKS, "counts", lambda opts: seen.append(torch.get_num_threads()) or {})
    record = harness.run_benchmark("counts", Options(threads=wanted))
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
    assert seen == [wanted] and record["torch"]["threads"] == wanted
    assert torch.get_num_threads() == threads


def test_records_hold_no_absolute_paths(monkeypatch, tmp_path):
    """Mutation: `run_benchmark` without `relative_paths` (the committed results.json held the
    ray benchmark's temporary out_dir)."""
    elsewhere = Path("/opt/weights/vgg16.pth")          # under no known root: only its name stays

    def writes_paths(opts):
        with harness.temp_dir("ayt-bench-test-") as tmp, harness.temp_dir("ayt-bench-out-", "<out_dir>") as out:
            return {"config": {"trial": [f"out_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db"],
                               "scratch": str(tmp / "fm.pt"), "code": str(REPO / "ayt" / "bench" / "step.py"),
                               "home": str(Path.home() / "x"), str(tmp): "key", "weights": str(elsewhere),
                               "nested": [[f"see {tmp}/a and ({elsewhere})"]]},
                    "results": {"ok": 1}}

    monkeypatch.setitem(bench.BENCHMARKS, "paths", writes_paths)
    record = harness.run_benchmark("paths", Options(lpips_weights=(str(elsewhere), "/opt/lpips.pth")))
    assert not absolute_paths(record, tmp_path), absolute_paths(record, tmp_path)
    config = record["config"]
    assert config["trial"] == ["out_dir=<out_dir>", "tracking.uri=sqlite:///<out_dir>/mlflow.db"]
    assert config["scratch"] == "<tmp>/fm.pt" and config["code"] == "ayt/bench/step.py"
    assert config["weights"] == "<abs>/vgg16.pth"
    assert record["options"]["lpips_weights"] == ["<abs>/vgg16.pth", "<abs>/lpips.pth"]


def test_front_door_share_and_overhead_from_the_study_runs(tmp_path):
    """Mutations: a trial's seconds not multiplied by its CPUs; no fallback to
    `train_seconds`; FID seconds left out; the parent run counted as a trial."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("batch_size_sweep")
    parent = client.create_run(experiment, run_name="study").info.run_id
    client.log_metric(parent, "time/train_seconds", 999.0)
    a = client.create_run(experiment, run_name="a", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_batch(a, metrics=[Metric("time/train_seconds", v, 0, s) for s, v in ((1, 10.0), (2, 50.0))]
                     + [Metric("time/eval_seconds", 5.0, 0, 2)],
                     params=[Param("scaling.resources_per_worker.CPU", "2"), Param("batch_size", "16")])
    b = client.create_run(experiment, run_name="b", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_batch(b, metrics=[Metric("train_seconds", 30.0, 0, 1)])
    for run in (a, b, parent):
        client.set_terminated(run)

    trials = trial_times(uri)
    assert [(t["run_name"], t["core_s"]) for t in trials] == [("a", 110.0), ("b", 30.0)]
    assert trials[1]["train_key"] == "train_seconds" and trials[1]["eval_s"] is None
    result = summarize_front_door(wall_s=100.0, cores=2, trials=trials)
    assert result["training_share"] == pytest.approx(140 / 200)
    assert result["overhead_per_trial_s"] == pytest.approx(30.0)
    assert result["trials"] == 2 and result["finished_trials"] == 2


def test_readme_table_is_what_the_generator_prints_for_the_committed_records():
    """Mutation: any number typed into the table of studies/benchmarks/README.md by hand (or a
    results.json regenerated without regenerating the table)."""
    records = table.load_records(REPO / "studies" / "benchmarks" / "results.json")
    readme = (REPO / "studies" / "benchmarks" / "README.md").read_text()
    assert table.readme_block(readme) == table.render(records)


def test_table_figures_come_from_the_records():
    """Mutation: a row that prints a constant instead of the record's value."""
    records = table.load_records(REPO / "studies" / "benchmarks" / "results.json")
    before = table.render(records)
    changed = json.loads(json.dumps(records))
    for record in changed:
        if record["benchmark"] == "mfd":
            record["results"]["cpu"]["speedup"] = 9.87
        if record["benchmark"] == "step":
            record["results"]["cpu"]["losses"]["mfd"]["median_s"] = 4.321
    after = table.render(changed)
    assert after != before and "9.87×" in after and "4321 ms" in after
