"""`front_door`: the README's first command, `python -m ayt.studies.batch_size_sweep`, as a new
user runs it: in a subprocess, from an empty working directory, with the default relative
`out_dir=runs` (8 trials x 20,480 images on the `quick` preset, shared artifacts included).

Recorded: the wall time of the command, and how much of the machine it kept busy training:

  training_share       = sum over trials of (train + FID seconds) x CPUs of the trial
                         / (wall_s x usable cores)
  overhead_per_trial_s = (wall_s x cores - that core time) / trials: core-seconds per trial
                         spent on anything else (Ray and Tune, worker start-up, checkpoints,
                         the shared artifacts, the report, idle cores)

Per-trial seconds come from the study's MLflow child runs (`<out_dir>/mlflow.db`, experiment
`batch_size_sweep`): the last values of `time/train_seconds` (or `train_seconds`, its older
name) and `time/eval_seconds`; a trial's CPUs are `scaling.resources_per_worker.CPU` x
`scaling.num_workers` of its params (1 each when absent).

`--front-door-args` appends overrides to the command (a quick check:
`--front-door-args study.budget.amount=640`); the targets apply to the default work only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from ayt.bench import Options, benchmark
from ayt.bench.harness import register_path, target, temp_dir, usable_cpus

MODULE = "ayt.studies.batch_size_sweep"
EXPERIMENT = "batch_size_sweep"
OUT_DIR = "runs"                                   # the config default: relative to the working directory
TARGET_WALL_S = 480.0                              # <= 8 min on 2 cores
TARGET_TRAINING_SHARE = 0.75                       # >= 75% of core time in training + FID
TRAIN_KEYS = ("time/train_seconds", "train_seconds")
EVAL_KEYS = ("time/eval_seconds",)
# --quick: one tiny trial on the smoke networks, cheap artifacts (a check of the harness only).
QUICK_ARGS = ("study.axes.batch_size=[32]", "study.axes.loss=[pseudo_huber]", "study.budget.amount=128",
              "study.budget.evals=1", "experiment=smoke", "pretrain.iterations=20", "feature_map.iterations=20",
              "fid.classifier.iterations=20", "fid.num_samples=100")
LOG_TAIL = 4000


def _last(metrics: dict[str, float], keys: tuple[str, ...]) -> tuple[float | None, str | None]:
    for key in keys:
        if key in metrics:
            return float(metrics[key]), key
    return None, None


def _number(params: dict[str, str], key: str, default: float) -> float:
    try:
        value = float(params[key])
    except (KeyError, TypeError, ValueError):
        return default
    return value if value > 0 else default


def trial_times(tracking_uri: str, experiment: str = EXPERIMENT) -> list[dict[str, Any]]:
    """One entry per child run (a study trial) of `experiment`: its train and FID seconds, its
    CPUs, and their product (core-seconds), its status and number of artifacts."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs([found.experiment_id], max_results=10_000)
    trials = []
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        metrics, params = run.data.metrics, run.data.params
        train, train_key = _last(metrics, TRAIN_KEYS)
        evaluation, eval_key = _last(metrics, EVAL_KEYS)
        cpus = _number(params, "scaling.resources_per_worker.CPU", 1.0) * _number(params, "scaling.num_workers", 1.0)
        seconds = (train or 0.0) + (evaluation or 0.0)
        trials.append({"run_name": run.info.run_name, "status": run.info.status,
                       "batch_size": params.get("batch_size"), "loss": params.get("loss"),
                       "train_s": train, "train_key": train_key, "eval_s": evaluation, "eval_key": eval_key,
                       "cpus": cpus, "core_s": seconds * cpus,
                       "artifacts": len(client.list_artifacts(run.info.run_id))})
    return sorted(trials, key=lambda t: str(t["run_name"]))


def summarize_front_door(wall_s: float, cores: int, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """training_share and overhead per trial from the command's wall time and its trials."""
    core_s = sum(t["core_s"] for t in trials)
    available = wall_s * cores
    n = len(trials)
    return {"wall_s": wall_s, "cores": cores, "trials": n,
            "finished_trials": sum(t["status"] == "FINISHED" for t in trials),
            "training_core_s": core_s, "available_core_s": available,
            "training_share": core_s / available if available > 0 else float("nan"),
            "overhead_per_trial_s": (available - core_s) / n if n else float("nan"),
            "trials_without_eval_seconds": sum(t["eval_s"] is None for t in trials),
            "trials_without_artifacts": sum(t["artifacts"] == 0 for t in trials),
            "per_trial": trials}


@benchmark("front_door")
def bench_front_door(opts: Options) -> dict[str, Any]:
    args = list(opts.front_door_args) or (list(QUICK_ARGS) if opts.quick else [])
    for arg in args:
        if arg.split("=", 1)[0].lstrip("+~") in ("out_dir", "tracking.uri", "tracking.experiment", "cache_dir"):
            raise ValueError(f"front_door runs with the default out_dir and tracking; drop {arg!r}")
    command = ["python", "-m", MODULE, *args]
    cores = usable_cpus()
    with temp_dir("ayt-bench-front-door-") as cwd, temp_dir("ayt-bench-front-door-log-") as logs:
        out_dir = cwd / OUT_DIR
        register_path(out_dir, "<out_dir>")
        env = dict(os.environ)
        # The code under test is the code of this process, wherever the command runs from.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        log = logs / "front_door.log"              # outside the working directory: that one starts empty
        with open(log, "w") as sink:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, *command[1:]], cwd=cwd, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=opts.front_door_timeout_s)
            wall = time.perf_counter() - start
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-LOG_TAIL:]
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}; its output ends:\n{tail}")
        trials = trial_times(f"sqlite:///{out_dir / 'mlflow.db'}")
        report = (out_dir / EXPERIMENT / "report.md").is_file()
    results = {**summarize_front_door(wall, cores, trials), "report_written": report}
    default_work = not args
    return {
        "config": {"command": shlex.join(command), "cwd": "an empty temporary directory",
                   "out_dir": f"{OUT_DIR} (the default, relative to the working directory)",
                   "default_work": default_work,
                   "training_share": "sum over trials of (train + FID seconds) x the trial's CPUs "
                                     "(scaling.resources_per_worker.CPU x scaling.num_workers) / (wall_s x cores)",
                   "overhead_per_trial_s": "(wall_s x cores - training core-seconds) / trials",
                   "per_trial_seconds": f"last value of {' or '.join(TRAIN_KEYS)} and {EVAL_KEYS[0]} of each MLflow "
                                        f"child run of experiment {EXPERIMENT}",
                   "targets": "for the default work (no extra args) on 2 cores"},
        "results": results,
        "targets": {"wall_s": target(wall, "<=", TARGET_WALL_S),
                    "training_share": target(results["training_share"], ">=", TARGET_TRAINING_SHARE)},
        "headline": f"{shlex.join(command)}: {wall:.0f} s wall, {results['trials']} trials, "
                    f"{100 * results['training_share']:.0f}% of {cores} cores in training + FID, "
                    f"{results['overhead_per_trial_s']:.0f} core-s overhead per trial"
                    + ("" if default_work else " (not the default work: targets do not apply)"),
    }
