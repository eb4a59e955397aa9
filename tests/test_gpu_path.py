"""The GPU path's own checks, on a CPU machine: a GPU that torch cannot use or that lacks the
precision's hardware is refused in one line naming the field (exit 2), the weights every
rank builds are the same, and DistributedDataParallel's options hold for our networks.

The GPU queries of `ayt.gpu` (`cuda_available`, `gpu_properties`) are replaced where a test
needs a GPU of a given kind: what is checked is the decision taken on what they report."""

from __future__ import annotations

import pytest
import torch

from ayt import gpu
from ayt.config import load_config
from ayt.errors import ConfigError
from ayt.gpu import CudaReport, GPUUnavailableError, check_cuda
from ayt.train import main


def _report(available=True, capability=(8, 0), nvml=True) -> CudaReport:
    return CudaReport(available=available, torch="2.x", cuda_build="12.8" if available else None, visible="0",
                      host="node-1", name="Tesla T4" if capability < (8, 0) else "NVIDIA A100",
                      capability=capability if available else None, nvml=nvml)


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "gpu_properties", lambda index: (name, capability))


# --- the decision on a report --------------------------------------------------------------

def test_check_cuda_refuses_a_torch_without_cuda_naming_the_field():
    cfg = {"precision": "fp32", "scaling": {"use_gpu": True}, "tracking": {"system_metrics": False}}
    with pytest.raises(GPUUnavailableError) as err:
        check_cuda(_report(available=False), cfg)
    assert err.value.field == "scaling.use_gpu"
    text = str(err.value)
    assert "\n" not in text and text.startswith("scaling.use_gpu: true asks for a GPU") and "cannot use CUDA" in text
    assert "CPU-only build" in text                              # says which torch it found
    with pytest.raises(GPUUnavailableError) as err:
        check_cuda(_report(available=False), {**cfg, "device": "cuda:1"}, field="device")
    assert err.value.field == "device" and str(err.value).startswith("device: cuda:1 asks for a GPU")


@pytest.mark.parametrize("precision", sorted(gpu.NATIVE_PRECISION))
def test_check_cuda_refuses_a_precision_the_gpu_lacks_and_says_what_to_use(precision):
    cfg = {"precision": precision, "scaling": {"use_gpu": True}, "tracking": {"system_metrics": False}}
    with pytest.raises(GPUUnavailableError) as err:
        check_cuda(_report(capability=(7, 5)), cfg)
    assert err.value.field == "precision"
    assert "compute capability >= 8.0" in str(err.value) and "7.5" in str(err.value)
    assert str(err.value).endswith("use precision=fp32")
    assert check_cuda(_report(capability=(8, 0)), cfg).startswith("scaling.use_gpu: torch 2.x sees NVIDIA A100")
    assert check_cuda(_report(capability=(7, 5)), {**cfg, "precision": "fp32"})      # fp32 runs anywhere


def test_check_cuda_wants_pynvml_where_gpu_metrics_are_asked_for():
    cfg = {"precision": "fp32", "scaling": {"use_gpu": True}, "tracking": {"system_metrics": True}}
    with pytest.raises(GPUUnavailableError) as err:
        check_cuda(_report(nvml=False), cfg)
    assert err.value.field == "tracking.system_metrics" and "ayt[gpu]" in str(err.value)
    assert check_cuda(_report(nvml=True), cfg)


# --- where the decision is taken -----------------------------------------------------------

def test_a_plain_run_refuses_bf16_on_a_gpu_without_it_before_any_work(monkeypatch, tmp_path, capsys):
    """Mutation caught: `_validate_device` no longer asking `ayt.gpu` about the run's GPU."""
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    out = tmp_path / "out"
    assert main(["device=cuda", "precision=bf16", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ayt: config error: precision: bf16 needs a GPU of compute capability")
    assert "Tesla T4" in err[0] and err[0].endswith("use precision=fp32")
    assert not out.exists()                                      # nothing ran
    assert load_config(["device=cuda", "precision=fp32", f"out_dir={out}"]).precision == "fp32"
    _fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    assert load_config(["device=cuda", "precision=bf16", f"out_dir={out}"]).precision == "bf16"
    # device=auto picks the GPU too, so it is checked the same way.
    _fake_gpu(monkeypatch, "Tesla V100", (7, 0))
    with pytest.raises(ConfigError) as refused:
        load_config(["precision=bf16", f"out_dir={out}"])
    assert refused.value.field == "precision"


def test_a_plain_run_asking_for_a_gpu_without_cuda_fails_before_any_work(tmp_path, capsys):
    """scaling.use_gpu=true on the plain loop (device=auto) would otherwise train on the CPU."""
    assert not torch.cuda.is_available()
    out = tmp_path / "out"
    assert main(["scaling.use_gpu=true", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ayt: config error: scaling.use_gpu: true asks for a GPU"), err
    assert not out.exists()
    assert load_config(["scaling.use_gpu=true", "device=cpu", f"out_dir={out}"]).device == "cpu"   # said plainly


def test_a_tune_trial_asking_for_a_gpu_its_torch_cannot_use_fails_naming_the_field(tmp_path):
    """The check a study trial makes in its own process, before it loads anything: the trial
    fails, and its error's last line (its MLflow run's `ayt.failure` tag) names the field."""
    from ayt.training.prepare import Artifacts
    from ayt.training.tune_trial import train_in_trial
    assert not torch.cuda.is_available()
    base = [f"out_dir={tmp_path}", "scaling.backend=ray"]
    for overrides, field in ((["scaling.use_gpu=true"], "scaling.use_gpu"),
                             (["scaling.use_gpu=true", "device=cuda"], "device")):
        cfg = load_config(base + overrides)
        with pytest.raises(GPUUnavailableError) as err:
            train_in_trial(cfg, Artifacts())
        assert err.value.field == field and "cannot use CUDA" in str(err.value)


@pytest.mark.parametrize("override, field", [
    ("tracking.system_metrics=maybe", "tracking.system_metrics"),
    ("tracking.system_metrics=1", "tracking.system_metrics"),
    ("tracking.system_metrics_interval_s=0", "tracking.system_metrics_interval_s"),
    ("tracking.system_metrics_interval_s=fast", "tracking.system_metrics_interval_s"),
])
def test_bad_system_metrics_options_fail_before_any_work(tmp_path, capsys, override, field):
    out = tmp_path / "out"
    assert main([f"out_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ayt: config error: {field}: ")
    assert not out.exists()


# --- every rank the same network -----------------------------------------------------------

def test_build_training_gives_every_rank_the_same_weights_whatever_its_rng(tmp_path):
    """Each rank seeds its own dropout stream before it builds the network; the network (and its
    random buffers, which DDP no longer broadcasts) must not depend on it. Mutation caught:
    `build_training` without its seeded construction."""
    from ayt.data import load_dataset
    from ayt.training.loop import WorkerContext, build_training, state_digest
    from ayt.training.prepare import Artifacts
    cfg = load_config(["experiment=smoke", f"out_dir={tmp_path}", "training.init=scratch", "loss=pseudo_huber",
                       "network.embedding=fourier", "diagnostics.tangent.enabled=false"])
    data = load_dataset(cfg.dataset, train=True)
    digests = []
    for rank in (0, 1):
        torch.manual_seed(int(cfg.seed) * 1009 + rank)        # what train_consistency does on each rank
        step = build_training(cfg, Artifacts(), WorkerContext(torch.device("cpu"), rank=rank, world_size=2), data)
        digests.append((state_digest(step.net), state_digest(step.ema.model)))
    assert digests[0] == digests[1]
    other = load_config(["experiment=smoke", f"out_dir={tmp_path}", "training.init=scratch", "loss=pseudo_huber",
                         "network.embedding=fourier", "diagnostics.tangent.enabled=false", "seed=1"])
    step = build_training(other, Artifacts(), WorkerContext(torch.device("cpu")), data)
    assert state_digest(step.net) != digests[0][0]               # the run's seed does choose the weights


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_training_changes_no_buffer_so_ddp_need_not_broadcast_them(tmp_path, embedding):
    """`broadcast_buffers=False` (ayt.training.ray_train.DDP_OPTIONS) is right only while no
    step changes a buffer of the denoiser (no BatchNorm statistics, say): a step here, with
    dropout, leaves every buffer as it was and moves the parameters."""
    from ayt.data import load_dataset
    from ayt.training.loop import WorkerContext, build_training
    from ayt.training.prepare import Artifacts
    from ayt.training.ray_train import DDP_OPTIONS
    assert DDP_OPTIONS == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    cfg = load_config(["experiment=smoke", f"out_dir={tmp_path}", "training.init=scratch", "loss=pseudo_huber",
                       f"network.embedding={embedding}", "diagnostics.tangent.enabled=false", "batch_size=8"])
    data = load_dataset(cfg.dataset, train=True)
    step = build_training(cfg, Artifacts(), WorkerContext(torch.device("cpu")), data)
    buffers = {k: b.clone() for k, b in step.net.named_buffers()}
    params = {k: p.detach().clone() for k, p in step.net.named_parameters()}
    x = torch.stack([data.as_torch_dataset()[i][0] for i in range(8)])
    step(x, 0)
    assert buffers or embedding == "positional"
    for key, before in buffers.items():
        assert torch.equal(before, dict(step.net.named_buffers())[key]), key
    assert any(not torch.equal(p, dict(step.net.named_parameters())[k]) for k, p in params.items())
