"""`report_scale`: the whole study report (`write_report`, every section that applies) of a
search study of 1,000 trials, from a real sqlite MLflow store and the study's real Optuna
storage, as a study's driver writes it after its last trial. Target: <= 30 s on 2 cores.

The study is `huber_sweep` (TPE over the log range `loss.huber_c`) with three more sampled
axes: `lr` (a log range), `lr_ref_batch` (an integer range) and `optimizer` (categorical),
planned with the real `plan_study`. Its trials are synthetic (`synthetic_search`, also what
tests/test_report_search.py builds): parameters drawn from the space, a final FID driven by
`loss.huber_c` (a parabola in log c, minimum at c = 0.003) plus a small `optimizer` offset and
noise (`lr` and `lr_ref_batch` do nothing), its curve falling to it over the budget's
evaluations, every 97th trial failed on a non-finite loss; each written as the tracker writes
it (a child run with params, tags and metric histories, `_vs_images` copies, `train/loss`,
`time/*`) and as OptunaSearch tells it (a COMPLETE trial with the final FID, FAIL for a failed
one) into `plan.optuna_db`. Building the store is not timed; each timed call writes the report
from it (loading the trials included). `--quick`: 40 trials, one call.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ayt.bench.registry import Options, benchmark

STUDY = "huber_sweep"
TRIALS, QUICK_TRIALS = 1000, 40
TARGET_S = 30.0                       # <= 30 s on 2 cores (about 35 s before it)
EXTRA_AXES = ("+study.axes.lr={low:0.0001,high:0.01,log:true}", "+study.axes.lr_ref_batch={low:16,high:256,int:true}",
              "+study.axes.optimizer=[adam,radam]")
START_MS = 1_700_000_000_000
BEST_C = 0.003                        # the synthetic optimum of loss.huber_c
FAIL_EVERY = 97


# The search alone, with Optuna's default start-up: the committed huber_sweep also confirms its
# best and stops trials early, which a report over synthetic trials has no use for.
PLAIN_SEARCH = ("study.protocol.name=single", "study.scheduler=none", "study.startup_trials=null")


def search_overrides(trials: int, extra: Sequence[str] = EXTRA_AXES) -> list[str]:
    return [f"study.num_samples={trials}", *PLAIN_SEARCH, *extra]


def search_plan(out_dir: str | Path, trials: int = TRIALS, extra: Sequence[str] = EXTRA_AXES,
                skip_configs: bool = False):
    """The planned search study (`plan_study`), out_dir under `out_dir`; `skip_configs`: its
    corner trial configs are not built (the report reads none of them: what the tests do)."""
    from ayt.studies.engine.plan import StudyPlan, plan_study
    if not skip_configs:
        return plan_study(STUDY, [f"out_dir={out_dir}", *search_overrides(trials, extra)])
    real = StudyPlan.trial_config
    StudyPlan.trial_config = lambda self, params, trial_id=None: self.base
    try:
        return plan_study(STUDY, [f"out_dir={out_dir}", *search_overrides(trials, extra)])
    finally:
        StudyPlan.trial_config = real


def sample(axis, rng) -> Any:
    """A value of `axis` as Optuna's random sampler draws it (log-uniform on a log range)."""
    if axis.values is not None:
        return axis.values[int(rng.integers(len(axis.values)))]
    lo, hi = float(axis.low), float(axis.high)
    if axis.integer:
        if axis.log:
            return int(min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 0.5)))))
        return int(rng.integers(int(lo), int(hi) + 1))
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))) if axis.log else rng.uniform(lo, hi))


def final_fid(params: dict[str, Any], rng) -> float:
    """The synthetic objective: huber_c drives it, the optimizer shifts it a little, lr and
    lr_ref_batch do nothing; lognormal noise of 3%."""
    c = params.get("loss__huber_c", BEST_C)
    fid = 20.0 + 12.0 * (math.log10(c) - math.log10(BEST_C)) ** 2 + (2.0 if params.get("optimizer") == "radam" else 0.0)
    return round(fid * float(rng.lognormal(0.0, 0.03)), 4)


def draws(plan, trials: int | None = None, seed: int = 0, objective=final_fid):
    """The synthetic trials of `plan`, in order: (index, params by Optuna name, histories,
    failed). Parameters are drawn from the space, the final FID from `objective`; the FID curve
    falls to it over the budget's evaluations; every FAIL_EVERY-th trial fails after two."""
    space = plan.space
    rng = np.random.default_rng(seed)
    iterations, eval_every = space.schedule(int(plan.base.batch_size))
    steps = list(range(eval_every, iterations + 1, eval_every))
    loss_every = max(1, steps[-1] // 12)
    for index in range(space.num_samples if trials is None else trials):
        params = {a.param: sample(a, rng) for a in space.all_axes}
        final = objective(params, rng)
        failed = index % FAIL_EVERY == FAIL_EVERY - 1
        evals = steps[:2] if failed else steps
        fid1 = [(s, round(final * (1 + 1.5 * (len(steps) - i - 1) / len(steps)), 4)) for i, s in enumerate(evals)]
        histories = {"eval/fid_1step": fid1, "eval/fid_2step": [(s, round(0.85 * v, 4)) for s, v in fid1],
                     "train/loss": [(s, round(0.5 / (1 + s / 50) + 0.01 * float(rng.random()), 5))
                                    for s in range(loss_every, evals[-1] + 1, loss_every)]}
        yield index, params, histories, failed


def synthetic_trials(plan, trials: int | None = None, seed: int = 0, objective=final_fid) -> list:
    """The same trials as `Trial`s, without a store (what `load_trials` would return)."""
    from ayt.studies.engine.trials import Trial
    out = []
    for index, params, histories, failed in draws(plan, trials, seed, objective):
        axes = {k.replace("__", "."): str(v) for k, v in params.items()}
        axes.setdefault("seed", str(plan.space.seeds[0]))
        out.append(Trial(f"run{index}", plan.space.label(params, f"{index:05d}"), axes, int(plan.base.batch_size),
                         "FAILED" if failed else "FINISHED", False, histories,
                         failure="NonFiniteLossError: non-finite loss" if failed else None,
                         started_ms=START_MS + 60_000 * index))
    return out


def synthetic_search(plan, uri: str, trials: int | None = None, seed: int = 0, optuna_storage: bool = True,
                     objective=final_fid) -> str:
    """A search study's parent run and its trials (`draws`; default: num_samples) as child
    runs in the MLflow store at `uri`, written as the tracker writes them, and, with
    `optuna_storage`, its Optuna study in `plan.optuna_db`; returns the parent's run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from ayt.studies.report.search import distribution
    space = plan.space
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"{plan.name}-{plan.study_id}",
                                          artifact_location=str(Path(plan.out_dir) / "artifacts"))
    parent = client.create_run(experiment, start_time=START_MS, run_name=plan.study_id,
                               tags={"ayt.study": plan.name}).info.run_id
    batch = int(plan.base.batch_size)
    told = []
    for index, params, histories, failed in draws(plan, trials, seed, objective):
        evals = [s for s, _ in histories["eval/fid_1step"]]
        trial_id = f"{index:05d}"
        tags = {"mlflow.parentRunId": parent, "ayt.study": plan.name, "ayt.study_id": plan.study_id,
                "ayt.trial_id": trial_id, "ayt.entry": "ayt.studies", "ayt.code_versions": "1" * 40,
                "ayt.stopped_early": "false", "ayt.final_iteration": str(evals[-1])}
        if failed:
            tags["ayt.failure"] = f"NonFiniteLossError: non-finite loss at iteration {evals[-1] + 1}: loss=nan"
        start = START_MS + 60_000 * index
        run = client.create_run(experiment, start_time=start, run_name=space.label(params, trial_id),
                                tags=tags).info.run_id
        run_params = {"batch_size": batch, "seed": space.seeds[0], "loss": "pseudo_huber",
                      **{f"axis.{k}": v for k, v in params.items()},
                      "artifact.fid_extractor": "classifier", "artifact.fid_classifier_hash": "c1a55f1e"}
        metrics = [Metric(k, v, start, s) for k, curve in histories.items() for s, v in curve]
        metrics += [Metric(k + "_vs_images", v, start, s * batch) for k, curve in histories.items()
                    if k.startswith("eval/") for s, v in curve]
        metrics += [Metric("time/train_seconds", 3.0 * i, start, s) for i, s in enumerate(evals, 1)]
        metrics += [Metric("time/eval_seconds", 1.5 * i, start, s) for i, s in enumerate(evals, 1)]
        client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in run_params.items()])
        client.set_terminated(run, "FAILED" if failed else "FINISHED", end_time=start + 30_000)
        told.append((params, None if failed else histories["eval/fid_1step"][-1][1]))
    client.set_terminated(parent, "FINISHED")
    if optuna_storage:
        write_optuna_study(plan, told, {a.param: distribution(a) for a in space.all_axes})
    return parent


def write_optuna_study(plan, told: list[tuple[dict[str, Any], float | None]], distributions: dict) -> None:
    """The Optuna study OptunaSearch would have left in `plan.optuna_db`: each trial COMPLETE
    with its final value, or FAIL."""
    import optuna
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        Path(plan.optuna_db).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name=plan.study_id, storage=f"sqlite:///{plan.optuna_db}",
                                    direction="minimize")
        study.add_trials([optuna.trial.create_trial(
            params=params, distributions=distributions, value=value,
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL)
            for params, value in told])
    finally:
        optuna.logging.set_verbosity(verbosity)


@benchmark("report_scale")
def bench_report_scale(opts: Options) -> dict[str, Any]:
    import torch

    from ayt.bench.harness import register_path, summarize, target, temp_dir, time_interleaved
    from ayt.studies.report.write import write_report
    trials = QUICK_TRIALS if opts.quick else TRIALS
    repeats = 1 if opts.quick else max(1, min(opts.repeats, 3))
    with temp_dir("ayt-bench-report-") as tmp:
        register_path(tmp / "out", "<out_dir>")
        start = time.perf_counter()
        plan = search_plan(tmp / "out", trials)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        parent = synthetic_search(plan, uri)
        setup_s = time.perf_counter() - start
        summaries, cpu = [], []

        def report(i: int) -> None:
            start_cpu = time.process_time()
            summaries.append(write_report(plan, uri, parent))
            cpu.append(time.process_time() - start_cpu)

        warmup = 0 if opts.quick else opts.warmup
        times = time_interleaved({"report": report}, warmup, repeats, torch.device("cpu"))
        summary = summaries[-1]
        written = sorted(Path(f).name for f in summary["files"])
        text = Path(summary["report"]).read_text()
    stats, cpu_stats = summarize(times["report"]), summarize(cpu[warmup:])
    return {
        "config": {"study": STUDY, "overrides": search_overrides(trials), "trials": trials,
                   "metrics_per_trial": "FID 1-/2-step at each evaluation (and their _vs_images copies), "
                                        "train/loss, time/train_seconds, time/eval_seconds",
                   "store": "sqlite MLflow store + the study's Optuna sqlite storage (building them is not timed)",
                   "timed": "write_report(plan, uri, parent): loading the trials and every section",
                   "report_cpu": "the process's CPU seconds per report (time.process_time): about the wall "
                                 "time on an idle machine (the report runs on one thread, BLAS aside)",
                   "repeats": repeats, "warmup": warmup},
        "results": {"report": stats, "report_cpu": cpu_stats, "setup_s": setup_s, "trials": summary["trials"],
                    "files": written,
                    "report_lines": len(text.splitlines()), "search_section": "## Search (" in text},
        "targets": {"report_s": target(stats["median_s"], "<=", TARGET_S)},
        "headline": f"the report of a {trials}-trial search study in {stats['median_s']:.1f} s wall, "
                    f"{cpu_stats['median_s']:.1f} CPU-s (median of {repeats}; {len(written)} files, "
                    f"{len(text.splitlines())} lines of report.md)",
    }
