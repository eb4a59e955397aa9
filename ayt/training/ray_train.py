"""Ray Train wraps the trainer: `TorchTrainer` runs `train_consistency` on every worker with
a `RayWorkerContext` (DDP through `prepare_model`, sharded data through
`prepare_data_loader`, checkpoints through `ray.train.report`). Same loop, same step."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.train
import torch
from omegaconf import DictConfig, OmegaConf
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ayt.config import run_name
from ayt.environ import environ
from ayt.errors import ConfigError, NonFiniteLossError
from ayt.gpu import GPUUnavailableError, check_training_device
from ayt.eval.metrics import logged_keys
from ayt.metrics import EVAL_SECONDS, TRAIN_SECONDS
from ayt.preflight import preflight
from ayt.provenance import CODE_VERSION, code_version
from ayt.system_metrics import system_metrics
from ayt.training.loop import RunState, WorkerContext, train_consistency
from ayt.training.prepare import Artifacts, configure_torch

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# DistributedDataParallel options: the denoiser's buffers (the embedding's frequencies) are
# fixed at construction, which every rank seeds alike (`build_training`), so broadcasting them
# before each forward is wasted; gradients as views of the all-reduce buckets save a copy.
DDP_OPTIONS = {"broadcast_buffers": False, "gradient_as_bucket_view": True}
# torch's words when Ray Train's NCCL process group (use_gpu) starts where torch has no CUDA:
# no GPU visible to it, or a CPU-only build. Such a worker group fails before any of our code runs.
NCCL_WITHOUT_CUDA = ("ProcessGroupNCCL is only supported with GPUs", "Distributed package doesn't have NCCL built in")


class RayWorkerContext(WorkerContext):
    """Rank, device, DDP and checkpoints from Ray Train."""

    def __init__(self):
        context = ray.train.get_context()
        super().__init__(ray.train.torch.get_device(), rank=context.get_world_rank(),
                         world_size=context.get_world_size())

    def prepare_model(self, net: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(net, move_to_device=self.device, parallel_strategy_kwargs=DDP_OPTIONS)

    def prepare_loader(self, loader):
        return ray.train.torch.prepare_data_loader(loader, move_to_device=True)

    def restore(self, load: Callable[[Path], RunState]) -> RunState | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load(Path(directory))

    def all_reduce(self, value: torch.Tensor, op: str = "max") -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_initialized():
            reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(value, op=reduce_op)
            if op == "mean":
                value = value / self.world_size
        return value

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "node_id": ray.get_runtime_context().get_node_id()}

    def checkpoint_registered(self, iteration: int) -> bool:
        """The controller's checkpoint snapshot names the checkpoint once it is registered
        (read through Ray Train's storage context, a DeveloperAPI: if that changes, don't wait)."""
        try:
            storage = ray.train.get_context().get_storage()
            path, fs = storage.checkpoint_manager_snapshot_path, storage.storage_filesystem
        except AttributeError:
            return True
        try:
            with fs.open_input_stream(path) as f:
                return f"iter_{iteration:09d}" in f.read().decode()
        except OSError:                          # not written yet
            return False

    def report(self, metrics: dict[str, Any], write_checkpoint=None) -> None:
        metrics = {**metrics, CODE_VERSION: code_version()}     # which code trained it (the study tags it)
        if write_checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp))
            # Every rank adds its files (state on rank 0, RNG on each) to one directory.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"iter_{int(metrics['iteration']):09d}")


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function TorchTrainer runs."""
    cfg = OmegaConf.create(config["cfg"])
    configure_torch(cfg)
    ctx = RayWorkerContext()
    ctx.scores = config.get("scores")
    # Ray gave this worker a GPU (use_gpu): a torch that cannot use it would train on the CPU, silently.
    check_training_device(cfg, ctx.device)
    sink = None
    if ctx.is_chief and config.get("run_id"):
        from ayt.tracking import RunLogger     # mlflow: only the chief worker of a tracked run logs
        sink = RunLogger(cfg.tracking.uri, config["run_id"])
    try:
        with system_metrics(cfg.tracking, config.get("metrics_run_id") or config.get("run_id"), ctx.rank,
                            ctx.world_size):
            train_consistency(cfg, config["artifacts"], ctx, sink=sink, progress=config.get("progress", True))
    except NonFiniteLossError as err:
        # Not a worker failure to retry: the run ends with the reason. Ray Train's Result
        # carries the metrics of the last *checkpoint* only, so rank 0 also leaves the reason
        # next to the run's checkpoints, where `raise_if_failed` finds it. The metric keys are
        # reported as NaN: a Tune searcher (OptunaSearch) reads its metric from every result.
        if ctx.is_chief:
            storage = ray.train.get_context().get_storage()
            with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{FAILURE_FILE}") as f:
                f.write(json.dumps({"iteration": err.iteration, "reason": str(err)}).encode())
        ray.train.report({"failure": str(err), "failed_iteration": err.iteration,
                          **{key: float("nan") for key in [*logged_keys(cfg.eval.metrics),
                                                           *getattr(ctx.scores, "keys", [])]}})


FAILURE_FILE = "ayt_failure.json"


@contextlib.contextmanager
def config_errors_from_workers(cfg: DictConfig) -> Iterator[None]:
    """Raise the ConfigError behind a failed fit, so the command says it in one line and exits 2:
    a worker that refused its config (a GPU its torch cannot use, a precision its GPU lacks)
    fails the fit with Ray's WorkerGroupError around it; a GPU worker group that could not even
    start (NCCL needs CUDA) fails it with a ControllerError that quotes torch."""
    try:
        yield
    except ray.train.WorkerGroupError as err:
        for failure in err.worker_failures.values():
            cause = failure
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__
            if cause is not None:
                raise type(cause)(cause.field, cause.message) from None
        raise
    except ray.train.ControllerError as err:
        if cfg.scaling.use_gpu and any(words in str(err) for words in NCCL_WITHOUT_CUDA):
            raise GPUUnavailableError("scaling.use_gpu", "true, but torch in Ray Train's GPU workers cannot use CUDA "
                                      "(their NCCL process group did not start); check the nodes' NVIDIA driver "
                                      "(nvidia-smi) and install a CUDA build of torch it supports, or set "
                                      "scaling.use_gpu=false") from None
        raise


def raise_if_failed(cfg: DictConfig, name: str) -> None:
    """Raise the NonFiniteLossError a worker of run `name` left behind, if any."""
    import pyarrow.fs     # only when a run is checked for a failure its worker left
    root = str(cfg.ray.storage_path)
    fs, base = pyarrow.fs.FileSystem.from_uri(root) if "://" in root else (pyarrow.fs.LocalFileSystem(), root)
    path = f"{base.rstrip('/')}/{name}/{FAILURE_FILE}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return
    with fs.open_input_stream(path) as f:
        failure = json.loads(f.read().decode())
    raise NonFiniteLossError(int(failure["iteration"]), failure["reason"].split(": ", 1)[-1])


def connect(cfg: DictConfig) -> list[str]:
    """Join `ray.address` (or start a local Ray with its dashboard on 127.0.0.1), then run
    the preflight: storage, tracking server and GPUs fail here, before any actor starts."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        quiet = {} if cfg.get("verbose") else {"log_to_driver": False, "logging_level": "ERROR"}
        if cfg.ray.address:
            ray.init(address=str(cfg.ray.address), **quiet)
        else:
            start_local_ray(**quiet)
    return preflight(cfg)


def start_local_ray(**kwargs) -> str:
    """Start a Ray of our own on this machine and make every process of it find it again.

    Ray's state API, which Ray Train's placement-group cleaner uses inside the cluster,
    looks for "the" local Ray when it is given no address; with two studies on one machine
    it finds two and fails. The GCS port is chosen up front (`RAY_GCS_SERVER_PORT`) so that
    `RAY_ADDRESS` can name it before the raylet starts: every worker inherits it."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    node_ip = ray.util.get_node_ip_address()
    with environ({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{node_ip}:{port}"}):
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return ray.get_runtime_context().gcs_address


def scaling_config(cfg: DictConfig) -> ScalingConfig:
    resources = OmegaConf.to_container(cfg.scaling.resources_per_worker, resolve=True) or None
    if resources:
        resources = {k: v for k, v in resources.items() if v and (k != "GPU" or cfg.scaling.use_gpu)} or None
    return ScalingConfig(num_workers=int(cfg.scaling.num_workers), use_gpu=bool(cfg.scaling.use_gpu),
                         resources_per_worker=resources)


def build_trainer(cfg: DictConfig, artifacts: Artifacts, run_id: str | None, name: str,
                  progress: bool = True, callbacks: list | None = None,
                  metrics_run_id: str | None = None, scores: Callable | None = None) -> TorchTrainer:
    """A TorchTrainer for the run `name`; the same name and storage path resume it. Rank 0
    logs to MLflow run `run_id`; every rank its system metrics to `metrics_run_id` (default:
    `run_id`; a study trial's child run, whose metrics its driver logs). Rank 0's reports also
    carry `scores` of the curves so far (a study's endpoint: `WorkerContext.scores`)."""
    os.environ[START_TIMEOUT_ENV] = str(cfg.ray.worker_start_timeout_s)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "artifacts": artifacts.to_dict(),
                           "run_id": run_id, "metrics_run_id": metrics_run_id, "progress": progress,
                           "scores": scores},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name, storage_path=str(cfg.ray.storage_path),
            failure_config=FailureConfig(max_failures=int(cfg.ray.max_failures), controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None),
    )


def train_with_ray(cfg: DictConfig, artifacts: Artifacts, logger, run_id: str, progress: bool = True) -> dict:
    """`scaling.backend=ray`: fit the TorchTrainer (after `connect`); the rank-0 worker
    writes the MLflow run."""
    with config_errors_from_workers(cfg):
        result = build_trainer(cfg, artifacts, run_id, run_name(cfg), progress).fit()
    raise_if_failed(cfg, run_name(cfg))
    metrics = result.metrics or {}
    curves = {key: [[s, v] for s, v in logger.history(key)] for key in logged_keys(cfg.eval.metrics)}
    return {"iteration": int(metrics.get("iteration", 0)), "curves": curves,
            "train_seconds": metrics.get(TRAIN_SECONDS), "eval_seconds": metrics.get(EVAL_SECONDS),
            "checkpoint": getattr(result.checkpoint, "path", None)}
