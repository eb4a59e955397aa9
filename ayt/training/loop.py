"""The consistency-training loop. One code path for 1 or N workers, CPU or GPU: a
`WorkerContext` supplies what differs (rank, device, DDP wrapping, where checkpoints go),
and every worker calls the same `ConsistencyStep`. Side effects happen on rank 0 only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ayt.artifacts import Artifacts
from ayt.config import run_name
from ayt.data import load_dataset
from ayt.diagnostics import Diagnostics, build_diagnostics
from ayt.errors import NonFiniteLossError
from ayt.eval.metrics import label as metric_label
from ayt.eval.probe import EvalProbe
from ayt.metrics import EVAL_SECONDS, HISTORY, LOSS, TRAIN, TRAIN_SECONDS
from ayt.method.ema import EMA
from ayt.method.losses import LossResources, build_loss
from ayt.method.schedule import ConsistencySchedule, PairNoise, lr_scale
from ayt.networks.precond import build_denoiser
from ayt.precision import check_applied
from ayt.startup import start_mode
from ayt.training.step import ConsistencyStep, unwrap

STATE_FILE = "state.pt"


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifacts(self, paths: list[str], artifact_path: str | None = None) -> None: ...


class WorkerContext:
    """A single process: no DDP, checkpoints in a local directory (kept: the last two)."""

    # Metrics each report adds from the curves so far (eval key -> [[iteration, value]]): how a
    # study's endpoint reaches Tune's scheduler and searcher (ayt/studies/protocols/endpoint.py); None: none.
    scores: Callable[[dict[str, list]], dict[str, float]] | None = None

    def __init__(self, device: torch.device, checkpoint_dir: str | os.PathLike | None = None,
                 rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None

    def describe(self) -> dict[str, Any]:
        """Where this worker ran (written into each checkpoint for provenance)."""
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "host": socket.gethostname(), "pid": os.getpid()}

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def prepare_model(self, net: nn.Module) -> nn.Module:
        return net

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def restore(self, load: Callable[[Path], "RunState"]) -> "RunState | None":
        """Apply `load` to the latest checkpoint directory, if there is one."""
        if not self.checkpoint_dir or not self.checkpoint_dir.is_dir():
            return None
        done = sorted(p for p in self.checkpoint_dir.iterdir() if (p / STATE_FILE).is_file())
        return load(done[-1]) if done else None

    def all_reduce(self, value: torch.Tensor, op: str = "max") -> torch.Tensor:
        """`value` reduced over all workers ("max" or "mean"); a single process has nothing to do."""
        return value

    def checkpoint_registered(self, iteration: int) -> bool:
        """Whether a restart would now resume from checkpoint `iteration` (a local directory
        is resumable as soon as it is renamed into place)."""
        return True

    def report(self, metrics: dict[str, Any], write_checkpoint=None) -> None:
        """Persist a checkpoint if given (``write_checkpoint(dir)`` writes this rank's files)."""
        if write_checkpoint is None or self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"iter_{int(metrics['iteration']):09d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoint_dir, prefix=".tmp-"))
        write_checkpoint(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in self.checkpoint_dir.iterdir() if p.name.startswith("iter_"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)


def accumulation_steps(per_worker_batch: int, batch_per_worker_max: int | None) -> int:
    """Smallest number of equal micro-batches that keeps each at or under the cap."""
    if not batch_per_worker_max or per_worker_batch <= batch_per_worker_max:
        return 1
    return next(a for a in range(math.ceil(per_worker_batch / batch_per_worker_max), per_worker_batch + 1)
                if per_worker_batch % a == 0)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class RunState:
    """What a checkpoint restores besides the networks and the optimizer."""

    iteration: int = 0
    curves: dict[str, list[list[float]]] = field(default_factory=dict)    # eval key -> [[iteration, value]]
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def timings(self) -> dict[str, float]:
        return {TRAIN_SECONDS: self.train_seconds, EVAL_SECONDS: self.eval_seconds}


def build_training(cfg: DictConfig, artifacts: Artifacts, ctx: WorkerContext, data,
                   diagnostics: Diagnostics | None = None):
    """Networks, optimizer, loss and step for one worker (pretrained weights loaded); the step
    calls the gradient hooks of `diagnostics` (None: those of `cfg`, for a step on its own)."""
    device = ctx.device
    # Every rank builds the same network from the run's seed: DDP broadcasts rank 0's
    # parameters but not its buffers (DDP_OPTIONS), and the per-rank dropout streams seeded
    # before this must not reach the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels)
        start_mode(cfg).initialise(net, artifacts.pretrained)     # the cached start, if the mode has one
    net = net.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    wrapped = ctx.prepare_model(net)
    # The EMA starts from the weights DDP trains (rank 0's, after the wrap's broadcast).
    ema = EMA(unwrap(wrapped), decay=float(cfg.training.ema_decay), halflife_kimg=cfg.training.ema_halflife_kimg)
    if cfg.compile:
        # Random numbers drawn as in eager mode (not by Inductor's own kernels): the RNG replay
        # that gives the target and the prediction one dropout mask (step.dropout_replay) then
        # holds compiled too, and a compiled step draws the masks an eager one would.
        wrapped = torch.compile(wrapped, options={"fallback_random": True})
    lr = float(cfg.lr) * lr_scale(str(cfg.lr_scaling), int(cfg.batch_size), int(cfg.lr_ref_batch))
    optimizer_class = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[str(cfg.get("optimizer", "adam"))]
    optimizer = optimizer_class(unwrap(wrapped).parameters(), lr=lr, betas=tuple(cfg.adam_betas))
    resources = LossResources.for_run(cfg.loss, artifacts.path, device)
    per_worker = int(cfg.batch_size) // ctx.world_size
    if diagnostics is None:
        diagnostics = build_diagnostics(cfg, ctx.rank, data, device, gradients_only=True)
    step = ConsistencyStep(
        net=wrapped, loss=build_loss(cfg.loss, resources),
        schedule=ConsistencySchedule.from_config(cfg.schedule, cfg.edm),
        noise=PairNoise(int(cfg.seed), device), optimizer=optimizer, ema=ema,
        global_batch=int(cfg.batch_size), rank=ctx.rank, world_size=ctx.world_size,
        accum_steps=accumulation_steps(per_worker, cfg.scaling.batch_per_worker_max),
        precision=str(cfg.precision), hooks=diagnostics.gradient_hooks())
    return step


def train_consistency(cfg: DictConfig | dict, artifacts: Artifacts | dict, ctx: WorkerContext,
                      sink: MetricSink | None = None, progress: bool = True) -> dict[str, Any]:
    """Consistency-train from `cfg` on this worker; returns rank 0's summary.

    Reports (and checkpoints) go through `ctx`; metrics also go to `sink` on rank 0.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    artifacts = artifacts if isinstance(artifacts, Artifacts) else Artifacts(**artifacts)
    check_applied(cfg)              # the precision policy is in effect in this process (configure_torch)
    device = ctx.device
    torch.manual_seed(int(cfg.seed) * 1009 + ctx.rank)      # per-rank dropout stream
    data = load_dataset(cfg.dataset, train=True)
    per_worker = int(cfg.batch_size) // ctx.world_size
    # The sampler shards one seeded global order, so the global batch of each step holds the
    # same images whatever the worker count (Ray's default sampler would ignore the seed).
    sampler = DistributedSampler(data.as_torch_dataset(), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=int(cfg.seed), drop_last=True)
    loader = ctx.prepare_loader(DataLoader(sampler.dataset, batch_size=per_worker, sampler=sampler,
                                           drop_last=True))
    diagnostics = build_diagnostics(cfg, ctx.rank, data, device)
    step = build_training(cfg, artifacts, ctx, data, diagnostics)
    state = ctx.restore(lambda directory: load_checkpoint(directory, step, ctx, diagnostics)) or RunState()
    if state.iteration and sink is not None and ctx.is_chief:
        sink.set_tags({"ayt.resumed_from_iteration": state.iteration})
    # Every rank samples and extracts its share of each evaluation; rank 0 gets the metrics.
    probe = EvalProbe(cfg, artifacts.fid_weights, artifacts.fid_cache, data, device, ctx.rank, ctx.world_size)
    tags = diagnostics.tags()
    if sink is not None and ctx.is_chief and tags:
        sink.set_tags(tags)
    total, it = int(cfg.training.iterations), state.iteration
    tr = cfg.training
    batches = len(loader)
    epoch, skip = divmod(it, batches)
    if state.iteration and it >= total:
        # Finished before whoever watched it died (a study driver killed before it saw the last
        # report): report the final result again so the restarted run ends where it ended.
        final = {key: curve[-1][1] for key, curve in state.curves.items() if curve and curve[-1][0] == it}
        ctx.report({**final, **(ctx.scores(state.curves) if ctx.scores else {}), "iteration": it,
                    "images_seen": it * int(cfg.batch_size), **state.timings()})
    bar = tqdm(total=total, initial=it, desc=f"consistency ({cfg.loss.name}, b{cfg.batch_size})",
               disable=not (progress and ctx.is_chief), mininterval=2.0)
    tick = time.perf_counter()
    history: list[list] = []          # log_every points since the last report (Tune gets them with it)
    while it < total:
        ctx.set_epoch(loader, epoch)
        for index, (x, _) in enumerate(loader):
            if index < skip:
                continue
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _maybe_fail(cfg, it, ctx)
            terms = step(x, it)
            it += 1
            bar.update(1)
            metrics: dict[str, float] = {}
            if it % tr.log_every == 0 or it == total:
                metrics.update(_scalars(terms, step, it, cfg, ctx))      # .item(): a sync point, only here
                bar.set_postfix(loss=f"{metrics[LOSS]:.4g}")
            evaluate = it % tr.eval_every == 0 or it == total
            checkpoint = it % tr.checkpoint_every == 0 or it == total
            if evaluate or checkpoint:
                now = time.perf_counter()
                state.train_seconds += now - tick
                if evaluate:            # every rank: a diagnostic may all-reduce
                    metrics.update(diagnostics.evaluate(step, it, lambda t: ctx.all_reduce(t, "mean")))
                if evaluate:
                    measured = probe(step.ema.model)      # every rank: its share of the samples
                    metrics.update(measured)
                    for key, value in measured.items():
                        state.curves.setdefault(key, []).append([it, value])
                    if measured:
                        first = next(iter(measured))
                        bar.set_postfix(loss=metrics.get(LOSS), **{metric_label(first): f"{measured[first]:.3g}"})
                    state.eval_seconds += time.perf_counter() - now
                state.iteration = it
                if evaluate and ctx.scores is not None:
                    metrics.update(ctx.scores(state.curves))
                metrics.update(iteration=it, images_seen=it * int(cfg.batch_size), **state.timings())
                if sink is not None and ctx.is_chief:
                    sink.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, step=it)
                if history:
                    metrics[HISTORY] = history
                ctx.report(metrics, (lambda d, s=state: save_checkpoint(d, step, s, ctx, diagnostics=diagnostics))
                           if checkpoint else None)
                history = []
                tick = time.perf_counter()
            elif metrics and ctx.is_chief:
                metrics.update(images_seen=it * int(cfg.batch_size))
                if sink is not None:
                    sink.log_metrics(metrics, step=it)
                history.append([it, metrics])
            if it >= total:
                break
        skip, epoch = 0, epoch + 1
    bar.close()
    summary = {"iteration": it, "train_seconds": state.train_seconds, "eval_seconds": state.eval_seconds,
               "curves": state.curves}
    if ctx.is_chief:
        summary["artifacts"] = write_final_artifacts(cfg, step, state, probe, sink)
    return summary


def _scalars(terms: dict[str, torch.Tensor], step: ConsistencyStep, it: int, cfg: DictConfig,
             ctx: WorkerContext) -> dict[str, float]:
    """Loss terms averaged over workers, as floats named `train/<term>`; raises on every rank
    at once if any rank saw a non-finite loss."""
    keys = sorted(terms)
    means = ctx.all_reduce(torch.stack([terms[k].float() for k in keys]), "mean")
    values = {TRAIN + key: float(v) for key, v in zip(keys, means.tolist())}
    bad = int(ctx.all_reduce(step.first_bad_iteration.clone(), "max"))
    if bad >= 0:
        raise NonFiniteLossError(bad, f"loss={values[LOSS]} (loss.name={cfg.loss.name}, lr={cfg.lr}, "
                                 f"batch_size={cfg.batch_size})")
    return values


def _maybe_fail(cfg: DictConfig, it: int, ctx: WorkerContext) -> None:
    """Test hook: kill this worker process at a chosen iteration, once (marker file).

    It dies only once the last checkpoint before `it` is resumable: Ray Train registers a
    reported checkpoint when its controller next polls the workers, and a worker that dies
    before that poll restarts from the one before (or from scratch), which is Ray's
    documented behaviour, not the restart path this hook exists to test."""
    target = cfg.training.get("fail_at_iteration")
    if target is None or it != int(target) or ctx.rank != ctx.world_size - 1:
        return
    marker = Path(cfg.out_dir) / f".failed-once-{cfg.get('name') or 'run'}-{target}"
    if marker.exists():
        return
    last = it // int(cfg.training.checkpoint_every) * int(cfg.training.checkpoint_every)
    deadline = time.monotonic() + 120
    while last and not ctx.checkpoint_registered(last) and time.monotonic() < deadline:
        time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os._exit(1)


def save_checkpoint(directory: str | os.PathLike, step: ConsistencyStep, state: RunState,
                    ctx: WorkerContext, extra: dict | None = None, diagnostics: Diagnostics | None = None) -> None:
    """Rank 0 writes networks/optimizer/counters; every rank writes its RNG state, the
    state of its diagnostics, and where it ran with digests of its network and EMA."""
    directory = Path(directory)
    if ctx.is_chief:
        torch.save({
            "net": unwrap(step.net).state_dict(), "ema": step.ema.state_dict(),
            "optimizer": step.optimizer.state_dict(), "iteration": state.iteration,
            "stage": step.schedule.stage(state.iteration), "curves": state.curves,
            "train_seconds": state.train_seconds, "eval_seconds": state.eval_seconds,
            **(extra or {}),
        }, directory / STATE_FILE)
    torch.save(rng_state(ctx.device), directory / f"rng_rank{ctx.rank}.pt")
    if diagnostics is not None:
        diagnostics.save(directory, ctx.rank)
    # Each rank's weights by digest: equal on every rank as long as DDP keeps them in step.
    digests = {"net_sha256": state_digest(unwrap(step.net)), "ema_sha256": state_digest(step.ema.model)}
    (directory / f"worker_rank{ctx.rank}.json").write_text(json.dumps({**ctx.describe(), **digests}))


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(directory: str | os.PathLike, step: ConsistencyStep, ctx: WorkerContext,
                    diagnostics: Diagnostics | None = None) -> RunState:
    directory = Path(directory)
    blob = torch.load(directory / STATE_FILE, map_location=ctx.device, weights_only=True)
    unwrap(step.net).load_state_dict(blob["net"])
    step.ema.load_state_dict(blob["ema"])
    step.optimizer.load_state_dict(blob["optimizer"])
    if diagnostics is not None:
        diagnostics.load(directory, ctx.rank, ctx.device, blob)
    rng_file = directory / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True), ctx.device)
    return RunState(iteration=int(blob["iteration"]), curves=blob["curves"],
                    train_seconds=float(blob.get("train_seconds", 0.0)), eval_seconds=float(blob.get("eval_seconds", 0.0)))


def write_final_artifacts(cfg: DictConfig, step: ConsistencyStep, state: RunState, probe: EvalProbe,
                          sink: MetricSink | None) -> list[str]:
    """Sample grids (the last evaluation's images), a curve PNG per metric quantity
    (`fid_curve.png`, ...) and the final EMA weights under out_dir/runs/<name>/."""
    from ayt.eval.plots import save_curves, save_sample_grid   # matplotlib: rank 0 draws once, at the end
    from ayt.eval.metrics import MIN, parse_key
    out = Path(cfg.out_dir) / "runs" / run_name(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if probe.last is None:          # no evaluation in this process (a finished run started again)
        probe.generate(step.ema.model)
    paths = [save_sample_grid(probe.last[k], out / f"samples_{k}step.png") for k in sorted(probe.last)]
    by_quantity: dict[str, dict[str, list]] = {}
    for key, curve in state.curves.items():
        parsed = parse_key(key)
        if parsed and curve:
            by_quantity.setdefault(parsed[0].name, {})[f"{parsed[1]}-step"] = curve
    for name, curves in by_quantity.items():
        quantity = parse_key(f"{name}_1step")[0]
        paths.append(save_curves(curves, out / f"{name}_curve.png", ylabel=quantity.label,
                                 log_y=quantity.direction == MIN and all(v > 0 for c in curves.values() for _, v in c),
                                 title=f"{cfg.loss.name}, batch {cfg.batch_size}"))
    torch.save(step.ema.state_dict(), out / "ema.pt")
    paths.append(out / "ema.pt")
    paths = [str(p) for p in paths]
    if sink is not None:
        sink.log_artifacts(paths)
    return paths
