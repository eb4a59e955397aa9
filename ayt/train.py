"""`python -m ayt.train [hydra overrides]`: one consistency-training run.

Pipeline: validate the whole config -> shared artifacts (pretrained denoiser, feature map,
FID extractor + reference statistics) -> consistency training with an FID curve -> MLflow.
Running the same command again resumes the run of the same name.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ayt.config import flatten, load_config, print_dry_run, run_name
from ayt.errors import ConfigError, NonFiniteLossError
from ayt.metrics import short

USAGE = """usage: python -m ayt.train [--cfg] [key=value ...]

Hydra overrides, e.g. experiment=smoke out_dir=/tmp/ayt loss=pseudo_huber batch_size=32.
  --cfg     make every check the run makes before it starts (paths, addresses, resources),
            print the resolved config and exit: 0 only when the run would start
Config groups: dataset, network, schedule, loss, augment, scaling, experiment (see conf/)."""


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config, the short names a researcher filters by in the MLflow UI, and the
    torch settings its precision policy makes in every training process (`torch.*`)."""
    from ayt.precision import precision_params     # torch: not on the usage/--cfg path
    params = flatten(cfg)
    params.update(loss=cfg.loss.name, huber_c=cfg.loss.get("huber_c"), dataset=cfg.dataset.name,
                  augment=cfg.augment.name, schedule_q=cfg.schedule.q)
    params.update(precision_params(cfg))
    return params


# torch, Ray and MLflow (ayt.training.*, ayt.tracking, ayt.preflight's clients) are imported
# where a run starts, not here: usage, a config error and `--cfg` answer without them.
def run(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the training run `cfg` describes; returns its summary."""
    from ayt.tracking import RunLogger, start_or_resume_run
    from ayt.training.prepare import ensure_artifacts

    name = run_name(cfg)
    if cfg.scaling.backend == "ray":
        from ayt.training.ray_train import connect
        connect(cfg)       # preflight before any artifact, MLflow run or Ray actor
    artifacts = ensure_artifacts(cfg, progress=progress)
    # The shared artifacts' records (feature-map R², classifier accuracy) are params, named as
    # a study's trials name them: `artifact.<key>`.
    params = {**run_params(cfg), **{f"artifact.{k}": v for k, v in artifacts.metrics.items()}}
    run_id, resumed = start_or_resume_run(cfg.tracking.uri, cfg.tracking.experiment, name, params,
                                          tags={"ayt.entry": "ayt.train"})
    logger = RunLogger(cfg.tracking.uri, run_id)
    logger.record_code()
    logging.getLogger(__name__).info("%s MLflow run %s (%s)", "resuming" if resumed else "started", run_id, name)
    try:
        summary = TRAIN_BACKENDS[str(cfg.scaling.backend)](cfg, artifacts, logger, run_id, progress)
    except NonFiniteLossError as err:
        logger.set_tags({"ayt.failure": str(err), "ayt.failed_iteration": err.iteration})
        logger.finish("FAILED")
        raise
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")
    summary.update(run_id=run_id, run_name=name, resumed=resumed)
    return summary


def _train_local(cfg, artifacts, logger, run_id, progress):
    """The plain single-process loop (no Ray): the reference the Ray path is measured against."""
    from ayt.system_metrics import system_metrics
    from ayt.training.loop import WorkerContext, train_consistency
    from ayt.training.prepare import configure_torch
    ckpt_dir = Path(cfg.out_dir) / "runs" / run_name(cfg) / "checkpoints"
    ctx = WorkerContext(configure_torch(cfg), checkpoint_dir=ckpt_dir)
    with system_metrics(cfg.tracking, run_id):
        return train_consistency(cfg, artifacts, ctx, sink=logger, progress=progress)


def _train_ray(cfg, artifacts, logger, run_id, progress):
    """Ray Train: 1..N data-parallel workers, checkpoints and restarts (`scaling.*`, `ray.*`)."""
    from ayt.training.ray_train import train_with_ray
    return train_with_ray(cfg, artifacts, logger, run_id, progress)


TRAIN_BACKENDS = {"local": _train_local, "ray": _train_ray}


def check_backend(cfg: DictConfig) -> None:
    """What only the Ray backend reads is refused with the local one (it trains in this process,
    one worker, no Ray): a cluster address or several workers would be silently ignored."""
    if cfg.scaling.backend == "ray":
        return
    if cfg.ray.get("address"):
        raise ConfigError("ray.address", f"{cfg.ray.address!r} is set, but scaling.backend="
                          f"{cfg.scaling.backend} trains in this process without Ray; add scaling.backend=ray to "
                          "train on that cluster, or drop ray.address")
    if int(cfg.scaling.num_workers) > 1:
        raise ConfigError("scaling.num_workers", f"{cfg.scaling.num_workers} workers need Ray Train, but "
                          f"scaling.backend={cfg.scaling.backend} trains in one process; add scaling.backend=ray, "
                          "or set scaling.num_workers=1")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    dry_run = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    try:
        cfg = load_config(args)
        check_backend(cfg)
        from ayt.preflight import check_locations
        check_locations(cfg, uses_ray=cfg.scaling.backend == "ray")   # every path and address, before any work
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    if dry_run:                          # every check above passed: the run would start
        return print_dry_run(OmegaConf.to_yaml(cfg))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ayt").setLevel(logging.INFO)
    if cfg.scaling.backend == "ray":
        from ayt.logs import route_logs
        route_logs(Path(cfg.out_dir) / "logs" / f"{run_name(cfg)}.log", verbose=bool(cfg.get("verbose")))
    try:
        summary = run(cfg, progress=bool(cfg.progress))
    except NonFiniteLossError as err:
        print(f"ayt: training failed: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    fids = {short(k): v[-1][1] for k, v in summary.get("curves", {}).items() if v}
    print(f"ayt: run {summary['run_name']} finished at iteration {summary['iteration']}: "
          + ", ".join(f"{k}={v:.3f}" for k, v in fids.items()) + f" (MLflow run {summary['run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
