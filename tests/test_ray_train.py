"""Ray Train wraps the trainer: equivalence across worker counts, a real worker death,
driver restart, and clear errors instead of hung worker groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ayt.config import load_config
from ayt.train import main, run
from ayt.training.prepare import ensure_artifacts

SMOKE = ["experiment=smoke", "scaling.backend=ray", "progress=false"]
SHORT = ["training.iterations=120", "training.eval_every=40", "training.checkpoint_every=20", "fid.num_samples=100"]


def _run(out: Path, name: str):
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("ayt")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ayt.run_name") == name]
    return client, runs


def _final_state(out: Path, name: str, iteration: int) -> dict:
    path = out / "ray" / name / f"iter_{iteration:09d}" / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in state.values()])


def test_two_ray_workers_half_batch_equal_plain_loop_full_batch(ray_session, shared_out_dir):
    """Same global batch and data order, dropout off: two Ray Train workers with half the
    batch each land where the plain single-process loop does after K steps."""
    common = ["experiment=smoke", "progress=false", f"out_dir={shared_out_dir}", "network.dropout=0",
              # Dropout off means a denoiser of its own; its quality is irrelevant here, so a short one.
              "pretrain.iterations=20", "batch_size=16", "training.iterations=4", "training.eval_every=4", "training.checkpoint_every=4",
              "fid.num_samples=50"]
    assert main(common + ["scaling.backend=local", "name=equiv-plain"]) == 0
    assert main(common + ["scaling.backend=ray", "scaling.num_workers=2", "name=equiv-2w"]) == 0
    assert main(common + ["scaling.backend=local", "name=equiv-other-seed", "seed=1"]) == 0
    start = _flat(_pretrained(common))
    plain = shared_out_dir / "runs" / "{}" / "checkpoints" / "iter_000000004" / "state.pt"
    one, other = (_flat(torch.load(str(plain).format(n), map_location="cpu", weights_only=True)["net"])
                  for n in ("equiv-plain", "equiv-other-seed"))
    two = _flat(_final_state(shared_out_dir, "equiv-2w", 4)["net"])
    moved = (one - start).norm()
    # Tolerance: 5% of how far 4 Adam steps moved the weights. The float32 reduction order
    # differs (DDP all-reduce of two half-batch means vs one mean), and the consistency
    # objective amplifies rounding: D(x_t, t) - D(x_r, r) cancels at small t and is weighted
    # by w = 1/(t - r), and MFD normalises that gradient per sample. Measured: 1.4%.
    assert (one - two).norm() / moved < 0.05
    # The control that makes the check meaningful: another data order/noise lands far away.
    assert (one - other).norm() / moved > 0.3
    # A one-worker study trial trains inside its Tune trial process: the same
    # result as the Ray Train path for the same seed, within the same tolerance.
    in_trial = _flat(_train_in_tune_trial(common + ["scaling.backend=ray", "name=equiv-in-trial"],
                                          shared_out_dir / "tune-equiv")["net"])
    assert (in_trial - two).norm() / moved < 0.05
    assert (in_trial - one).norm() / moved < 0.05


def _train_in_tune_trial(overrides: list[str], storage: Path) -> dict:
    """Run `train_in_trial` as a study's Tune trial does; return its final checkpoint state."""
    from ray import tune

    from ayt.training.tune_trial import train_in_trial

    def trainable(config):
        cfg = load_config(overrides)
        train_in_trial(cfg, ensure_artifacts(cfg, progress=False))

    tuner = tune.Tuner(tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 1}])),
                       run_config=tune.RunConfig(name="equiv", storage_path=str(storage), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def _pretrained(overrides: list[str]) -> dict:
    """The denoiser these runs started from (the shared cache holds other tests' ones too)."""
    cfg = load_config(overrides)
    path = ensure_artifacts(cfg, progress=False).pretrained
    return torch.load(path, map_location="cpu", weights_only=True)


def test_worker_death_restarts_from_checkpoint_with_one_clean_fid_curve(ray_session, shared_out_dir):
    """Two workers from scratch; one dies at iteration 30 and the group restarts from the
    checkpoint at 20: one MLflow run, every metric logged once, the final result reported
    again by the same command.

    The same run checks that the ranks start in step: init=scratch with a Fourier embedding (a
    random buffer DDP does not broadcast), and at the checkpoint before the death every rank's
    network and EMA are bit-identical (each rank writes their digests into the checkpoint).
    Mutation caught: the EMA copied before the DDP wrap while each rank builds its network from
    its own dropout seed. It also logs MLflow's system metrics from each rank."""
    name = "worker-dies"
    # 40 iterations: a checkpoint at 20 to restart from, the death at 30, iterations 21-30
    # trained by both attempts (each step must still reach MLflow once), one evaluation after.
    args = SMOKE + [f"out_dir={shared_out_dir}", f"name={name}", "scaling.num_workers=2", "training.iterations=40",
                    "training.eval_every=20", "training.checkpoint_every=20", "training.log_every=10",
                    "fid.num_samples=100", "training.init=scratch", "network.embedding=fourier",
                    "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.5"]
    code = main(args + ["training.fail_at_iteration=30", "ray.max_failures=1"])
    assert code == 0
    assert (shared_out_dir / f".failed-once-{name}-30").exists()     # the worker really died
    before_death = shared_out_dir / "ray" / name / "iter_000000020"   # written by the first worker group
    ranks = [json.loads((before_death / f"worker_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["ema_sha256"] == ranks[1]["ema_sha256"]
    assert ranks[0]["net_sha256"] == ranks[1]["net_sha256"]
    client, runs = _run(shared_out_dir, name)
    assert len(runs) == 1
    run_ = runs[0]
    metrics = run_.data.metrics
    for rank in (0, 1):
        assert f"system/rank{rank}/cpu_utilization_percentage" in metrics, sorted(metrics)
        assert f"system/rank{rank}/system_memory_usage_megabytes" in metrics
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["ayt.resumed_from_iteration"] == "20"
    for key in ("eval/fid_1step", "eval/fid_2step", "train/loss", "images_seen"):
        steps = [m.step for m in client.get_metric_history(run_.info.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "eval/fid_1step")] == [20, 40]
    # The same command once more: the finished run reports its final result again (what a
    # resumed study needs when its driver died before seeing it) and logs nothing twice.
    again = run(load_config(args), progress=False)
    assert again["iteration"] == 40 and again["run_id"] == run_.info.run_id
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "eval/fid_1step")] == [20, 40]


def test_driver_killed_then_same_command_resumes_same_mlflow_run(ray_session, shared_out_dir):
    name = "driver-killed"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ayt.train", *SMOKE, f"out_dir={shared_out_dir}", f"name={name}",
           f"ray.address={address}", *SHORT]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    # Kill only once Ray Train has registered a checkpoint (its snapshot names it); a
    # checkpoint directory alone may still be mid-upload and is not resumable yet.
    snapshot = shared_out_dir / "ray" / name / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if snapshot.exists() and "iter_0" in snapshot.read_text():
            break
        time.sleep(0.5)
    assert snapshot.exists() and "iter_0" in snapshot.read_text(), "no registered checkpoint before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    assert main([*SMOKE, f"out_dir={shared_out_dir}", f"name={name}", *SHORT]) == 0
    client, runs = _run(shared_out_dir, name)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["ayt.resumed_from_iteration"]) >= 20
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/fid_1step")]
    assert steps == [40, 80, 120]
    assert _final_state(shared_out_dir, name, 120)["iteration"] == 120


def test_gpu_request_on_cpu_cluster_is_a_clear_error(ray_session, shared_out_dir, capsys):
    code = main(SMOKE + [f"out_dir={shared_out_dir}", "name=wants-gpu", "scaling.use_gpu=true",
                         "scaling.resources_per_worker={CPU: 1, GPU: 1}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "scaling.use_gpu" in err
    assert not (shared_out_dir / "ray" / "wants-gpu").exists()


def test_gpu_workers_whose_torch_cannot_use_cuda_fail_before_training(shared_out_dir, capsys):
    """Ray counts a GPU its workers' torch cannot use (here a node given a GPU resource on a
    machine without one: Ray sets CUDA_VISIBLE_DEVICES, torch finds no CUDA). The preflight's
    probe on that node stops the run in one line, exit 2, before any artifact or worker; a fit
    started without it (a GPU node the preflight could not see yet) says the same."""
    import ray

    from ayt.gpu import GPUUnavailableError
    from ayt.training.prepare import Artifacts
    from ayt.training.ray_train import build_trainer, config_errors_from_workers
    ray.shutdown()                  # the session's Ray has no GPU; this one has one torch cannot use
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        args = SMOKE + [f"out_dir={shared_out_dir}", "scaling.use_gpu=true", "ray.max_failures=0"]
        capsys.readouterr()
        assert main(args + ["name=fake-gpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ayt: config error: scaling.use_gpu: true asks for a GPU"), err
        assert "cannot use CUDA" in err[0] and "CUDA_VISIBLE_DEVICES='0'" in err[0]
        assert not (shared_out_dir / "ray" / "fake-gpu").exists()
        # Ray Train's NCCL process group fails to start on such a worker; the fit names the field.
        cfg = load_config(args)
        with pytest.raises(GPUUnavailableError) as refused:
            with config_errors_from_workers(cfg):
                build_trainer(cfg, Artifacts(), None, "fake-gpu-fit", progress=False).fit()
        assert refused.value.field == "scaling.use_gpu"
    finally:
        ray.shutdown()              # the ray_session fixture starts the session's Ray again
