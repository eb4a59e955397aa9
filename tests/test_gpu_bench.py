"""`python -m ayt.bench gpu` (ayt/bench/gpu.py) on a machine without a GPU: it exits 2 with one
line; its whole code path runs on the CPU (`--quick --device cpu`) in a process where Ray,
MLflow and Optuna cannot be imported (the GPU machine has only PyTorch); the MFU arithmetic,
the datasheet lookup, the FLOP scaling and the record writer and table row it relies on.

Mutations caught: an import of ray/mlflow/optuna anywhere on the benchmark's path, at module
level or inside a function it calls (the blocker records every attempt, caught or not); a
missing CUDA check (the CPU would be timed as the GPU); MFU against the wrong peak or
inverted; a datasheet pattern that takes an A100 for an A10 or an L40S for an L4; FLOPs that
are not linear in the batch (the count at batch 2 scaled to 128 would be wrong)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ayt.bench import table
from ayt.bench.gpu import datasheet_peak, utilisation

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "mlflow", "optuna")

# Run a module as __main__ in a process where importing a blocked package fails and is recorded.
BLOCKER = textwrap.dedent("""
    import importlib.abc, runpy, sys
    attempts = []
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {blocked!r}:
                attempts.append(name)
                raise ImportError(f"blocked: {{name}}")
    sys.meta_path.insert(0, Blocker())
    sys.argv = {argv!r}
    try:
        if sys.argv[0] == "-c":
            exec(sys.argv[1])
        else:
            runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    finally:
        with open({log!r}, "w") as f:
            f.write("\\n".join(attempts))
    sys.exit(code)
""")


def _blocked_run(argv: list[str], log: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=BLOCKED, argv=argv, log=str(log))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    proc = _blocked_run(["ayt.bench", "gpu"], tmp_path / "attempts.txt")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ayt.bench gpu: device: cpu: the gpu benchmark needs a CUDA GPU")
    assert proc.stdout == "" and (tmp_path / "attempts.txt").read_text() == ""


def test_the_blocker_catches_an_import_of_ray(tmp_path):
    """Control: the same harness records (and fails) a module that does import Ray."""
    proc = _blocked_run(["-c", "import ayt.training.ray_train"], tmp_path / "attempts.txt")
    assert proc.returncode != 0 and "blocked: ray" in proc.stderr
    assert "ray" in (tmp_path / "attempts.txt").read_text().split()


@pytest.fixture(scope="module")
def quick_record(tmp_path_factory):
    """The whole benchmark on the CPU (tiny network, no compile) without Ray, MLflow, Optuna."""
    out = tmp_path_factory.mktemp("gpu-bench")
    proc = _blocked_run(["ayt.bench", "gpu", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                         "--threads", "1", "--out", str(out / "gpu.json")], out / "attempts.txt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), proc, (out / "attempts.txt").read_text()


def test_quick_run_on_the_cpu_imports_neither_ray_mlflow_nor_optuna(quick_record):
    records, proc, attempts = quick_record
    assert attempts == ""                      # not even a caught attempt
    assert json.loads(proc.stdout.splitlines()[0]) == records[0]


def test_quick_record_holds_every_variant_the_evaluation_and_the_arithmetic(quick_record):
    (record,), _, _ = quick_record
    assert record["benchmark"] == "gpu" and record["config"]["quick"]
    results = record["results"]
    assert set(results) == {"fp32", "tf32", "bf16", "fp32+compile", "tf32+compile", "bf16+compile"}
    for name in ("fp32", "tf32", "bf16"):
        r = results[name]
        assert r["batch_size"] == 4 and r["median_s"] > 0 and r["peak_source"] == "measured matmul"
        assert r["flops_per_step"] == pytest.approx(record["flops"]["per_image"]["total"] * 4)
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_step"] / r["median_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / record["peaks_tflops"]["measured"][name])
    assert all("skipped" in results[f"{p}+compile"] for p in ("fp32", "tf32", "bf16"))
    fid = record["fid_evaluation"]
    assert fid["num_samples"] == 20 and fid["total_s"] > 0 and set(fid["phases_s"]) >= {"generation", "extraction"}
    rows = table.render([record])                                   # the table row of a gpu record
    assert "gpu, cpu: bf16, cifar10_paper step, batch 4" in rows and "not measured (--quick on the CPU" in rows


def test_mfu_is_achieved_over_the_given_peak():
    got = utilisation(flops_per_step=2e12, seconds_per_step=0.5, peak_tflops=10.0)
    assert got == {"achieved_tflops": pytest.approx(4.0), "mfu": pytest.approx(0.4)}
    assert utilisation(1e12, 1.0, None) == {"achieved_tflops": pytest.approx(1.0), "mfu": None}


@pytest.mark.parametrize("name, entry", [
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10", "A10"), ("NVIDIA A10G", None), ("Tesla T4", None),
])
def test_datasheet_peak_by_device_name(name, entry):
    found = datasheet_peak(name)
    assert (found[0] if found else None) == entry
    if found:
        peaks = found[1]
        assert peaks["bf16"] >= peaks["tf32"] > 0 and peaks["fp32"] > 0


def test_step_flops_are_linear_in_the_batch(tmp_path):
    from dataclasses import replace

    from ayt.bench import Options
    from ayt.bench.gpu import QUICK
    from ayt.bench.roofline import step_flops
    import torch
    counts = {b: step_flops(replace(QUICK, batch=b), Options(), torch.device("cpu"), tmp_path) for b in (2, 4)}
    for key in ("unet_forward_backward", "feature_map_mfd"):
        assert counts[2][key] > 0 and counts[4][key] == 2 * counts[2][key]


def test_named_table_block_is_appended_then_rewritten(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\n")
    table.update(readme, "gpu table v1", block="gpu")
    table.update(readme, "gpu table v2", block="gpu")
    text = readme.read_text()
    assert table.readme_block(text, "gpu") == "gpu table v2" and table.readme_block(text) == "old"
    assert text.count("bench-table:gpu:start") == 1
