"""`ray`: the same small trial through Ray Train (1 worker) and through the plain loop, and a
Ray Tune study of small trials against the same trials run one after another in a Python loop.

The in-process trials set torch's thread count (`cpu_threads`); the harness restores it."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient

from ayt.bench import Options, benchmark
from ayt.bench.harness import target, temp_dir
from ayt.config import load_config
from ayt.studies.runner import plan_study, run_study
from ayt.train import run

TARGET_RAY_OVERHEAD = 0.10         # Ray Train (1 worker) per-step time <= 1.10x the plain loop
TARGET_STUDY_WALL_RATIO = 1.10     # a Tune study of small trials <= 1.10x the same trials in a plain loop
STUDY_TRIALS = 2


def trial_overrides(out_dir: Path, iterations: int, threads: int) -> list[str]:
    """A smoke-sized trial whose artifacts (feature map, FID classifier) build in seconds."""
    return ["experiment=smoke", f"out_dir={out_dir}", "progress=false", "training.init=scratch",
            "feature_map.iterations=20", "fid.classifier.iterations=20", "fid.num_samples=100",
            f"training.iterations={iterations}", f"training.eval_every={iterations}",
            f"training.checkpoint_every={iterations}", f"cpu_threads={threads}"]


def _run_trial(overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(overrides)
    start = time.perf_counter()
    summary = run(cfg, progress=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_seconds": float(summary["train_seconds"]), "iterations": int(summary["iteration"]),
            "s_per_step": float(summary["train_seconds"]) / int(summary["iteration"])}


def _start_ray() -> tuple[float, bool]:
    """A fresh local Ray as `ayt.training.ray_train.connect` starts one (dashboard on 127.0.0.1);
    address="local" so that it never joins another session's cluster."""
    if ray.is_initialized():
        return 0.0, False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    return time.perf_counter() - start, True


@benchmark("ray")
def bench_ray(opts: Options) -> dict[str, Any]:
    iterations = 10 if opts.quick else opts.ray_iterations
    threads = opts.ray_threads
    results: dict[str, Any] = {}
    with temp_dir("ayt-bench-ray-", placeholder="<out_dir>") as tmp:
        common = trial_overrides(tmp, iterations, threads)
        if opts.quick:
            common += ["network.model_channels=8", "network.channel_mult=[1]", "batch_size=8"]
        # The first local run also builds the shared artifacts (its wall time says so); local
        # runs before and after the Ray run bracket any drift of the machine's load.
        local_first = _run_trial(common + ["scaling.backend=local", "name=bench-local-1"])
        init_s, started = _start_ray()
        try:
            ray_run = _run_trial(common + ["scaling.backend=ray", "scaling.num_workers=1", "name=bench-ray"])
            study = run_study_trials(opts, common, iterations)
        finally:
            if started:
                ray.shutdown()
        local_second = _run_trial(common + ["scaling.backend=local", "name=bench-local-2"])
        study = compare_study_with_loop(study, common)
        # Against the faster of the two bracketing local runs: the first one also pays its
        # process's cold start (measured 0.153 vs 0.115 s/step), which flattered Ray when
        # the two were averaged (0.87x in studies/benchmarks/results.json, 1.01x vs the warm run).
        local_step = min(local_first["s_per_step"], local_second["s_per_step"])
        per_step_ratio = ray_run["s_per_step"] / local_step
        results = {
            "local_first": local_first, "ray": ray_run, "local_second": local_second,
            "ray_init_s": init_s,
            "per_step_ratio_ray_over_local": per_step_ratio,
            "per_step_overhead": per_step_ratio - 1.0,
            "ray_fixed_overhead_s": (ray_run["wall_s"] - ray_run["train_seconds"])
                                    - (local_second["wall_s"] - local_second["train_seconds"]),
            "study": study,
        }
    targets = {"ray_train_per_step_overhead": target(results["per_step_overhead"], "<=", TARGET_RAY_OVERHEAD)}
    if "wall_ratio_study_over_local" in study:
        targets["study_wall_ratio_over_local"] = target(study["wall_ratio_study_over_local"], "<=",
                                                        TARGET_STUDY_WALL_RATIO)
    return {
        "config": {"trial": common, "local": ["scaling.backend=local"],
                   "ray": ["scaling.backend=ray", "scaling.num_workers=1"],
                   "per_step": "train_seconds / iterations as the loop reports it (time between FID/checkpoint "
                               "boundaries: data loading + step + logging; FID, checkpoints and start-up excluded)",
                   "ray_init": "ray.init(address='local', include_dashboard=True) before the run, timed apart",
                   "ray_fixed_overhead": "(wall - train_seconds) of the Ray run minus that of the second local "
                                         "run: worker group start, Train controller, checkpoint upload",
                   "threads": f"cpu_threads={threads} in both runs: one thread per process, as a worker reserving "
                              "CPU: 1 runs (Ray sets OMP_NUM_THREADS=1 in it); on 2 shared cores two OpenMP threads "
                              "per process are pathologically slow whenever anything else runs"},
        "results": results,
        "targets": targets,
        "headline": f"Ray Train per-step {per_step_ratio:.3f}x the plain loop; ray.init {init_s:.1f} s, "
                    f"fixed overhead {results['ray_fixed_overhead_s']:.1f} s"
                    + (f"; study of {study['trials']} trials {study['wall_ratio_study_over_local']:.2f}x the loop"
                       if "wall_ratio_study_over_local" in study else ""),
    }


def run_study_trials(opts: Options, trial: list[str], iterations: int) -> dict[str, Any]:
    """N small trials as a study (`ayt.studies.runner`: Tune + OptunaSearch + one Ray Train
    worker per trial, driver-side MLflow); `compare_study_with_loop` then runs the same N
    trials one after another through the plain loop. The trials differ only in their seed
    (the loss_sweep study with its loss axis cut to mfd and `study.seeds` = 0..N-1), one at
    a time (`study.max_concurrent_trials=1`): the comparison is of machinery, not of
    parallelism. Expects Ray to be running (started by the caller)."""
    n = 2 if opts.quick else STUDY_TRIALS
    # Same out_dir as the plain runs: the artifact cache (feature map, FID classifier and
    # statistics) is already built, so the study's wall time is the trials'.
    keep = [o for o in trial if not o.startswith(("training.iterations=", "training.eval_every=",
                                                      "training.checkpoint_every=", "experiment="))]
    plan = plan_study("loss_sweep", ["study.axes.loss=[mfd]",
                                     f"study.seeds=[{','.join(map(str, range(n)))}]",
                                     "study.budget.unit=iterations", f"study.budget.amount={iterations}",
                                     "study.budget.evals=1", "study.max_concurrent_trials=1",
                                     f"training.checkpoint_every={iterations}", *keep])
    start = time.perf_counter()
    summary = run_study(plan, progress=False)
    study_wall = time.perf_counter() - start
    client = MlflowClient(str(plan.base.tracking.uri))
    experiment = client.get_experiment_by_name(str(plan.base.tracking.experiment))
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    return {"trials": n, "iterations_per_trial": iterations, "errors": summary["errors"],
            "study_wall_s": study_wall,
            "study_train_seconds": [train_seconds(r.data.metrics) for r in children],
            "study_overrides": plan.argv}


def compare_study_with_loop(study: dict[str, Any], trial: list[str]) -> dict[str, Any]:
    """The plain-loop side of the study comparison (run with Ray shut down)."""
    if "skipped" in study:
        return study
    n = int(study["trials"])
    local = [_run_trial(trial + [f"seed={seed}", "scaling.backend=local", f"name=bench-study-local-{seed}"])
             for seed in range(n)]
    local_wall = sum(r["wall_s"] for r in local)
    local_train = [r["train_seconds"] for r in local]
    return {**study, "local_wall_s_sum": local_wall, "local_train_seconds": local_train,
            "wall_ratio_study_over_local": study["study_wall_s"] / local_wall,
            "train_seconds_ratio_study_over_local": statistics.mean(study["study_train_seconds"])
            / statistics.mean(local_train),
            "study_overhead_s_per_trial": (study["study_wall_s"] - local_wall) / n}


def train_seconds(metrics: dict[str, float]) -> float:
    """A trial's training seconds from its MLflow metrics (`time/train_seconds`, formerly `train_seconds`)."""
    return float(metrics["time/train_seconds"] if "time/train_seconds" in metrics else metrics["train_seconds"])
