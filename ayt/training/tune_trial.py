"""A single-worker study trial trains inside its own Ray Tune trial process: the same loop
and step as every other path, with reports and checkpoints going straight to Tune.

A Ray Train worker group per trial costs ~25 s of start-up on a small machine (a controller
and a worker process, each importing torch and Ray Train) for nothing a one-worker trial
needs: there is no gradient to all-reduce. Tune already restores a failed trial from its last
reported checkpoint, and with `reuse_actors` the next trial finds torch, the data and the
FID extractor loaded. Multi-worker (and multi-GPU) trials keep Ray Train.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from ayt.gpu import check_training_device
from ayt.provenance import CODE_VERSION, NODE_ID, RESUMED_FROM, code_version
from ayt.system_metrics import system_metrics
from ayt.training.loop import RunState, WorkerContext, train_consistency
from ayt.training.prepare import Artifacts, configure_torch


class TuneTrialContext(WorkerContext):
    """Rank 0 of 1, in the Tune trial's process: checkpoints through `ray.tune.report`. Its
    results say which Ray node it runs on, and the first one after a restore from which
    checkpoint iteration (a preempted trial's MLflow run records both)."""

    resumed_from: int | None = None

    def restore(self, load: Callable[[Path], RunState]) -> RunState | None:
        from ray import tune
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = load(Path(directory))
        self.resumed_from = state.iteration
        return state

    def report(self, metrics: dict[str, Any], write_checkpoint=None) -> None:
        import ray
        from ray import tune
        metrics = {**metrics, CODE_VERSION: code_version(),      # which code trained it (the study tags it)
                   NODE_ID: ray.get_runtime_context().get_node_id()}
        if self.resumed_from is not None:
            metrics[RESUMED_FROM], self.resumed_from = self.resumed_from, None
        if write_checkpoint is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    def checkpoint_registered(self, iteration: int) -> bool:
        """`tune.report` returns once the driver has taken the previous result off the queue;
        give it a moment to register the checkpoint that came with it (test hook only)."""
        time.sleep(2.0)
        return True


def train_in_trial(cfg: DictConfig, artifacts: Artifacts, run_id: str | None = None,
                   scores: Callable | None = None) -> dict[str, Any]:
    """Train the trial `cfg` in this process (its system metrics into MLflow run `run_id`, the
    trial's child run). A non-finite loss, or a GPU the config asks for that torch here cannot
    use, raises: the trial fails, and the error's last line (the reason) becomes its MLflow
    run's `ayt.failure` tag. Each report also carries `scores` of the curves so far (a study's
    endpoint: `WorkerContext.scores`)."""
    device = configure_torch(cfg)
    check_training_device(cfg, device)
    if not cfg.get("cpu_threads"):
        # As many torch threads as CPUs the trial reserved (Ray Train does the same for its
        # workers): two 1-CPU trials with torch's default threads each on 2 cores oversubscribe
        # them, and spinning OpenMP threads then run several times slower.
        import ray
        import torch
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
    with system_metrics(cfg.tracking, run_id):
        ctx = TuneTrialContext(device)
        ctx.scores = scores
        return train_consistency(cfg, artifacts, ctx, progress=False)
