"""The precision policy (ayt/precision.py): each `precision` value sets torch's TF32 switches,
fp32 matmul precision and cuDNN autotuner in the process that trains, the step autocasts only
under bf16, a process that trains without the policy applied is refused, and the settings
are the run's MLflow params. Each test restores torch's global flags.

Mutations caught: configure_torch no longer calling apply_precision (the flags keep the
opposite state the test set); fp32 leaving cuDNN's TF32 on (PyTorch's default); the step's
autocast keyed on anything but the policy (tf32 autocasting, bf16 not); run_params without the
torch.* settings; train_consistency without its check (a process that skipped configure_torch
trains with torch's defaults)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ayt.config import compose_config, load_config
from ayt.method.losses import PseudoHuber
from ayt.method.schedule import ConsistencyPair
from ayt.precision import (PRECISIONS, apply_precision, check_applied, effective_settings, precision_params,
                           preserved_backend_flags)
from ayt.training.prepare import configure_torch
from ayt.training.step import ConsistencyStep, consistency_terms

EXPECTED = {   # precision -> (TF32 for matmuls and convolutions, float32 matmul precision, autocast)
    "fp32": (False, "highest", "off"),
    "tf32": (True, "high", "off"),
    "bf16": (True, "high", "bfloat16"),
}


def _set_all(tf32: bool, benchmark: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize("precision", sorted(EXPECTED))
@pytest.mark.parametrize("benchmark", [True, False])
def test_configure_torch_sets_every_flag_the_policy_names(precision, benchmark):
    tf32, matmul, autocast = EXPECTED[precision]
    cfg = compose_config([f"precision={precision}", f"cudnn_benchmark={str(benchmark).lower()}", "device=cpu"])
    with preserved_backend_flags():
        _set_all(not tf32, not benchmark)          # start from the opposite of every setting
        assert configure_torch(cfg) == torch.device("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        assert torch.backends.cudnn.allow_tf32 is tf32       # fp32 is strict: cuDNN's TF32 default is on
        assert torch.get_float32_matmul_precision() == matmul
        assert torch.backends.cudnn.benchmark is benchmark
        assert effective_settings(precision) == {"matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32,
                                                 "float32_matmul_precision": matmul,
                                                 "cudnn_benchmark": benchmark, "autocast": autocast}
        check_applied(cfg)


def test_preserved_backend_flags_restores_what_apply_changed():
    before = effective_settings("fp32")
    with preserved_backend_flags():
        apply_precision("bf16" if not before["matmul_allow_tf32"] else "fp32", not before["cudnn_benchmark"])
        assert effective_settings("fp32") != before
    assert effective_settings("fp32") == before


class _RecordingNet(nn.Module):
    """D(x, sigma) that records whether autocast is on and the dtype its conv computes in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x, sigma):
        y = self.conv(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), y.dtype))
        return y.float() * sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("precision", sorted(EXPECTED))
def test_the_step_autocasts_only_under_bf16(precision):
    net = _RecordingNet()
    step = ConsistencyStep(net=net, loss=None, schedule=None, noise=None, optimizer=None, ema=None,
                           global_batch=2, precision=precision)
    x, t = torch.randn(2, 1, 4, 4), torch.full((2,), 0.5)
    pair = ConsistencyPair(x=x, t=t, r=t / 2, x_t=x, x_r=x)
    consistency_terms(net, PseudoHuber(0.0), pair, 0, 0.002, step.autocast(x.device))
    bf16 = precision == "bf16"
    assert net.seen == [(bf16, torch.bfloat16 if bf16 else torch.float32)] * 2    # target and prediction passes


def test_run_params_name_the_policy_settings_and_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from ayt.tracking import start_or_resume_run
    from ayt.train import run_params
    cfg = load_config(["precision=bf16", "cudnn_benchmark=false", f"out_dir={tmp_path}"])
    params = run_params(cfg)
    assert precision_params(cfg) == {"torch.matmul_allow_tf32": True, "torch.cudnn_allow_tf32": True,
                                     "torch.float32_matmul_precision": "high", "torch.cudnn_benchmark": False,
                                     "torch.autocast": "bfloat16"}
    with preserved_backend_flags():       # what the policy says is what a training process then runs with
        configure_torch(cfg)
        assert {f"torch.{k}": v for k, v in effective_settings("bf16").items()} == precision_params(cfg)
    run_id, _ = start_or_resume_run(cfg.tracking.uri, "precision", "r", params)
    logged = MlflowClient(cfg.tracking.uri).get_run(run_id).data.params
    assert {k: v for k, v in logged.items() if k.startswith("torch.")} == {
        "torch.matmul_allow_tf32": "True", "torch.cudnn_allow_tf32": "True",
        "torch.float32_matmul_precision": "high", "torch.cudnn_benchmark": "False", "torch.autocast": "bfloat16"}
    assert logged["precision"] == "bf16"


def test_training_without_the_policy_applied_is_refused(tmp_path):
    from ayt.training.loop import WorkerContext, train_consistency
    cfg = compose_config(["precision=fp32", "device=cpu", f"out_dir={tmp_path}"])
    with preserved_backend_flags():
        _set_all(True, False)             # torch's flags as another process (or the default) left them
        with pytest.raises(RuntimeError, match=r"precision=fp32: .*configure_torch\(cfg\) was not called"):
            train_consistency(cfg, {}, WorkerContext(torch.device("cpu")))


def test_every_precision_is_documented_in_the_config_and_the_gpu_docs():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    yaml_line = next(line for line in (root / "conf" / "config.yaml").read_text().splitlines()
                     if line.startswith("precision:"))
    docs = (root / "docs" / "gpu.md").read_text()
    for name in PRECISIONS:
        assert name in yaml_line and f"`precision={name}`" in docs


def test_cli_refuses_an_unknown_precision_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ayt.train", "precision=fp16", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("ayt: config error: precision: unknown value 'fp16'; "
                                                    "allowed: fp32, tf32, bf16")
    assert not (tmp_path / "mlflow.db").exists()
