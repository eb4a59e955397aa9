"""A planned study on Ray Tune: the function trainable and its two trial runners, shared
artifacts built once before the trials, Optuna's searcher and ASHA, and the Tuner that runs
(or restores) the study, with one MLflow parent run, a child per trial and the report.
`run_tune_then_repeat` and `run_search_then_confirm` run a two-stage protocol as a sequence of
such studies (`PROTOCOL_RUNNERS`: protocol name -> runner)."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ayt.artifacts import config_hash
from ayt.config import flatten, run_name
from ayt.errors import ConfigError
from ayt.provenance import CODE_VERSIONS_TAG, code_version, short_version, tag_list
from ayt.studies.protocols.search_then_confirm import (CONFIRM_FILE, baseline_edit, choose_candidates, confirm_edit, confirmation_record,
                                                       parse_confirm, write_confirmation)
from ayt.studies.engine.plan import StudyPlan, plan_study
from ayt.studies.protocols.tune_then_repeat import TUNING_FILE, choose_by_seed, parse_tune_stage, repeat_edit, write_tuning
from ayt.studies.protocols import seed_rounds
from ayt.studies.engine.resume import TuneOptunaState, requeue_orphaned_trials
from ayt.studies.engine.sampler import optuna_sampler  # noqa: F401  (re-exported: ayt.studies.runner)
from ayt.studies.engine.trials import load_trials

log = logging.getLogger(__name__)


class StudyError(RuntimeError):
    """A study cannot go on (not a config problem): the reason, in one line."""


def run_trial(config: dict[str, Any], plan: StudyPlan, parent_run_id: str | None = None) -> None:
    """The Tune function trainable. Its config is resolved against the driver's directory, so
    it finds the artifacts the driver built and writes where the tracker looks; with
    `tracking.system_metrics` it logs them into its child run of `parent_run_id`."""
    from ray import tune

    from ayt.training.prepare import ensure_artifacts
    trial_id = tune.get_context().get_trial_id()
    cfg = plan.trial_config(config, trial_id)
    artifacts = ensure_artifacts(cfg, progress=False)       # cached: built before the study, or once here
    run_id = None
    if cfg.tracking.system_metrics and parent_run_id:
        from ayt.studies.engine.tracker import find_child_run
        run_id = find_child_run(str(cfg.tracking.uri), parent_run_id, trial_id)
        if run_id is None:
            log.warning("trial %s: no MLflow child run appeared; its system metrics are not logged", trial_id)
    # Each report carries the study metric at its endpoint of the curve so far: what Tune ranks by.
    TRIAL_RUNNERS[plan.trial_backend](cfg, artifacts, run_id, plan.endpoint.reporter([plan.metric]))


def _train_in_process(cfg: DictConfig, artifacts, run_id: str | None, scores=None) -> None:
    from ayt.training.tune_trial import train_in_trial
    train_in_trial(cfg, artifacts, run_id, scores=scores)


def _train_with_ray_train(cfg: DictConfig, artifacts, run_id: str | None, scores=None) -> None:
    """One TorchTrainer per trial. Worker reports reach Tune through TuneReportCallback; the
    trial's stable name lets a retried or restored trial resume from its last Ray Train
    checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ayt.training.ray_train import build_trainer, config_errors_from_workers, raise_if_failed
    trainer = build_trainer(cfg, artifacts, None, run_name(cfg), progress=False, callbacks=[TuneReportCallback()],
                            metrics_run_id=run_id, scores=scores)
    with config_errors_from_workers(cfg):
        trainer.fit()
    raise_if_failed(cfg, run_name(cfg))


TRIAL_RUNNERS = {"in_process": _train_in_process, "ray_train": _train_with_ray_train}


def prebuild_artifacts(plan: StudyPlan, progress: bool = True) -> int:
    """Build each distinct set of shared artifacts once, on the driver, before any trial starts:
    two trials share a set when every artifact kind they use has the same spec (the kinds, not
    this function, know which artifacts a config needs)."""
    from ayt.training.prepare import artifact_specs, ensure_artifacts
    seen: set[str] = set()
    for cfg in plan.trial_configs:
        key = config_hash(artifact_specs(cfg))
        if key not in seen:
            seen.add(key)
            # No trial runs yet: build with torch's default threads (every core), not the
            # trials' cpu_threads.
            ensure_artifacts(OmegaConf.merge(cfg, {"cpu_threads": None}), progress=progress)
    return len(seen)


def max_concurrent_trials(plan: StudyPlan) -> int:
    """Configured, or as many trials as the cluster's resources can hold at once."""
    configured = plan.study.get("max_concurrent_trials")
    if configured:
        return int(configured)
    import ray

    from ayt.preflight import max_workers_at_once, worker_bundle
    available = ray.cluster_resources()
    per_trial = {k: v * int(plan.base.scaling.num_workers) for k, v in worker_bundle(plan.base).items()}
    fits = [available.get(k, 0.0) / v for k, v in per_trial.items() if v > 0]
    now = max(1, int(min(fits))) if fits else 1
    # An autoscaler adds nodes the cluster lacks now (GPU workers start at 0): count those too.
    ever = max_workers_at_once(plan.base) or 0.0
    return max(now, min(int(min(ever, 1e9)) // int(plan.base.scaling.num_workers), plan.space.trial_count()))


def optuna_searcher(plan: StudyPlan):
    """Tune's OptunaSearch over the plan's space; its Optuna study lives in `plan.optuna_db`,
    where a resume reads it again (ayt.studies.engine.resume)."""
    import optuna

    from ayt.studies.engine.searcher import StudySearch
    space, sampler = plan.space, optuna_sampler(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{plan.optuna_db}")
    return StudySearch(space=space.define_by_run, metric=plan.tune_metric, mode=plan.mode, sampler=sampler,
                        study_name=plan.study_id, storage=storage)


def _scheduler(plan: StudyPlan):
    if plan.study["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler
    asha = plan.study.get("asha") or {}
    batches = [int(c.batch_size) for c in plan.trial_configs] or [int(plan.base.batch_size)]
    max_t = plan.space.max_images(batches)
    grace = max_t // plan.space.evals * int(asha.get("grace_evals", 1))
    return ASHAScheduler(time_attr="images_seen", metric=plan.tune_metric, mode=plan.mode, max_t=max_t,
                         grace_period=grace, reduction_factor=float(asha.get("reduction_factor", 2)))


def run_study(plan: StudyPlan, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a planned study; returns the report summary."""
    from ray import tune

    from ayt.studies.engine.console import StudyConsole
    from ayt.studies.report.write import write_report
    from ayt.studies.engine.tracker import StudyTracker
    from ayt.tracking import RunLogger, start_or_resume_run
    from ayt.training.ray_train import connect

    note = check_start(plan)
    if note:
        log.info("%s", note)
    uri = str(plan.base.tracking.uri)
    connect(plan.base)                            # Ray + preflight, before any artifact or trial
    _set_tune_environment(plan)
    built = prebuild_artifacts(plan, progress=progress)
    log.info("shared artifacts ready (%d distinct settings)", built)

    parent_id, resumed = start_or_resume_run(
        uri, str(plan.base.tracking.experiment), plan.study_id,
        {**{f"study.{k}": v for k, v in flatten(_study_params(plan)).items()}},
        tags={"ayt.study": plan.name, "ayt.config_hash": plan.study_id.rsplit("-", 1)[1],
              "ayt.entry": f"ayt.studies.{plan.module}"})
    parent = RunLogger(uri, parent_id)
    parent.record_code()                          # appends this checkout's version on a resume
    tracker = StudyTracker(uri, str(plan.base.tracking.experiment), parent_id, plan.name, plan.describe)
    console = StudyConsole(plan.space.trial_count(), plan.metric, enabled=progress, label=plan.label)

    def fit(stage: StudyPlan) -> list:
        return _fit(stage, parent_id, tracker, console)
    try:
        if seed_rounds.enabled(plan.study):       # seeds until decisive: rounds under this parent
            grid = seed_rounds.run_in_rounds(plan, fit, lambda: load_trials(uri, parent_id), plan.metric)
        else:
            grid = fit(plan)
    except BaseException:
        parent.finish("FAILED")
        raise
    errors = sum(1 for r in grid if r.error is not None)
    summary = write_report(plan, uri, parent_id)
    parent.log_artifacts(summary["files"], artifact_path="report")
    parent.set_tags({"ayt.trials": len(grid), "ayt.trials_failed": errors})
    parent.finish("FINISHED" if errors == 0 else "FAILED")
    summary.update(parent_run_id=parent_id, resumed=resumed, trials=len(grid), errors=errors)
    return summary


def _fit(plan: StudyPlan, parent_id: str, tracker, console) -> list:
    """One Tune experiment of the study (the study itself, or one of its seed rounds): a new
    Tuner, or the saved one restored; its results."""
    from ray import tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, parent_run_id=parent_id),
                                    plan.trial_resources())
    state = TuneOptunaState(plan)
    if not state.experiment_exists():
        return list(_new_tuner(plan, trainable, callbacks=[tracker, console]).fit())
    requeue_orphaned_trials(plan, parent_id, close_run=tracker.close_run)
    if not state.has_experiment_state():
        # A driver killed before all of Tune's state reached storage (or while copying it) left
        # a Tuner and nothing to restore: Tune would start over with one trial per unvisited grid
        # point and stop. The Optuna study knows what finished; a new Tuner runs the rest
        # (orphans re-queued).
        finished = state.finished_trials()
        remaining = plan.space.trial_count() - finished
        log.warning("study %s: Tune's saved state is missing or incomplete (the driver stopped before it was "
                    "saved); running the %d trials the Optuna study has not finished", plan.study_id, remaining)
        console.done += finished
        if remaining <= 0:
            return []
        return list(_new_tuner(plan, trainable, callbacks=[tracker, console], num_samples=remaining).fit())
    tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                               resume_errored=True)
    console.done += _finished_trials(tuner)
    return list(tuner.fit())


def _set_tune_environment(plan: StudyPlan) -> None:
    """Tune's settings that only its environment variables reach (read when the Tuner starts)."""
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"   # a failed trial's last report has no FID
    # MLflow is the record (StudyTracker); Tune's JSON/CSV/TensorBoard files would only repeat it.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not plan.base.get("verbose"):
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")     # Tune's new reporter prints even at verbose=0
    # Save Tune's experiment state at every step (cheap at study sizes) so a killed driver
    # loses as little as possible: a trial finished but not yet saved restarts from its final
    # checkpoint and trains nothing.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")


def _new_tuner(plan: StudyPlan, trainable, callbacks: list, num_samples: int | None = None):
    """A fresh study's Tuner: Optuna proposes, ASHA (if chosen) stops, the callbacks record.
    `num_samples`: the trials still to run (all of the study's unless given)."""
    from ray import tune
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=optuna_searcher(plan), scheduler=_scheduler(plan),
                                    num_samples=plan.space.trial_count() if num_samples is None else num_samples,
                                    max_concurrent_trials=max_concurrent_trials(plan),
                                    # In-process trials keep torch, the data and the FID
                                    # extractor loaded from one trial to the next.
                                    reuse_actors=plan.trial_backend == "in_process"),
        run_config=tune.RunConfig(name=plan.study_id, storage_path=plan.storage_path, callbacks=callbacks,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=int(plan.study["max_failures"])),
                                  verbose=2 if plan.base.get("verbose") else 0))


def check_start(plan: StudyPlan) -> str | None:
    """What a study checks before its first trial, before Ray starts (a dry run stops here): a
    study that ran under this out_dir goes on only with resume=true and, unless allowed, on the
    code it ran on. Returns a note when resume=true finds nothing to resume."""
    resume = bool(plan.study.get("resume"))
    exists = TuneOptunaState(plan).experiment_exists()
    if exists and not resume:
        raise ConfigError("study.resume", f"study {plan.study_id} already exists under {plan.experiment_path}; "
                          "pass resume=true to finish it, or change study.name")
    if exists:
        check_code_version(plan, str(plan.base.tracking.uri))
        return None
    if resume:
        return (f"resume=true, but study {plan.study_id} has not run under {plan.storage_path}: nothing to "
                "resume, it starts from its first trial")
    return None


def check_code_version(plan: StudyPlan, uri: str) -> None:
    """Before resuming: refuse to go on with other code than the study ran on, unless asked.

    A study resumed on other code would mix trials trained by different code without saying
    so; that is refused, in one line naming both versions and the override. With
    `study.allow_code_change=true` it goes on, the parent run lists every version
    (`ayt.code_versions`) and each trial's child run the ones that trained it."""
    from mlflow.tracking import MlflowClient

    from ayt.tracking import find_run
    now = code_version()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(plan.base.tracking.experiment))
    parent = find_run(client, experiment.experiment_id, plan.study_id) if experiment else None
    if parent is None:
        return
    tags = parent.data.tags
    # Runs from before ayt.code_versions name their code in ayt.code_version or ayt.git_commit.
    seen = next((tag_list(tags, k) for k in (CODE_VERSIONS_TAG, "ayt.code_version", "ayt.git_commit")
                 if tags.get(k)), [])
    if not seen or seen[-1] == now:
        return
    if not plan.study.get("allow_code_change"):
        raise ConfigError("study.resume", f"study {plan.study_id} ran on code {short_version(seen[-1])}, this "
                          f"checkout is {short_version(now)}: its trials would be trained by different code; "
                          "pass study.allow_code_change=true to resume anyway (each trial records its code)")
    log.warning("study %s: resuming on code %s (it ran on %s)", plan.study_id, now, ", ".join(seen))


def run_tune_then_repeat(plan: StudyPlan, progress: bool = True) -> dict[str, Any]:
    """Stage 1: each group's tuning study, and its extension rounds while the winner is at a grid
    edge; stage 2: the study at each group's best value (ayt/studies/protocols/tune_then_repeat.py says why).
    Every stage and round resumes like any study: a round's config follows only from the
    finished rounds before it, so a resume restores the same rounds and reruns none."""
    from ayt.studies.protocols.tune_then_repeat import edge_side, extension_edit, group_key, groups, next_extension, separation
    stage = parse_tune_stage(plan.study, plan.space)
    labels = {group_key(plan.space, g): g for g in groups(plan.space)}
    _check_extension_values(plan, stage, labels)
    tuned: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {"key": stage.key, "low": stage.low, "high": stage.high, "log": stage.log,
                              "search": stage.search, "seeds": list(stage.seeds), "metric": str(plan.study["metric"]),
                              "endpoint": plan.endpoint.label,
                              "max_extensions": stage.max_extensions, "floor": stage.floor, "ceiling": stage.ceiling,
                              "groups": {}}
    failed = trials = 0
    for index, sub in enumerate(plan.tune_plans, 1):
        group = sub.study["protocol"]["group"]
        if progress:
            print(f"ayt: stage 1 ({index}/{len(plan.tune_plans)}): tuning {stage.key} for {group} "
                  f"(study {sub.study_id}, {sub.space.trial_count()} trials)", flush=True)
        summary = run_study(sub, progress=progress)
        failed, trials = failed + summary["errors"], trials + sub.space.trial_count()
        per_seed = _tuning_metrics(sub, summary["parent_run_id"], stage.key)
        best, means = choose_by_seed(per_seed, plan.metric)
        if best is None:
            raise StudyError(f"stage 1 of {plan.name}: every trial tuning {stage.key} for {group} failed "
                             f"(report {sub.out_dir / 'report.md'})")
        rounds: list[dict[str, Any]] = []
        while True:
            value, stop = next_extension(stage, best, list(per_seed))
            if value is None:
                break
            ext = plan_study(plan.module, sub.argv, extension_edit(plan.space, stage, labels[group], value,
                                                                   len(rounds) + 1))
            if progress:
                print(f"ayt: stage 1 ({index}/{len(plan.tune_plans)}): {group}'s best {stage.key} {best:g} is at "
                      f"the edge; extension {len(rounds) + 1}/{stage.max_extensions} tries {value:g} "
                      f"(study {ext.study_id}, {ext.space.trial_count()} trials)", flush=True)
            done = run_study(ext, progress=progress)
            failed, trials = failed + done["errors"], trials + ext.space.trial_count()
            for v, by_seed in _tuning_metrics(ext, done["parent_run_id"], stage.key).items():
                per_seed.setdefault(v, {}).update(by_seed)
            best, means = choose_by_seed(per_seed, plan.metric)
            rounds.append({"round": len(rounds) + 1, "value": value, "side": "low" if value < stage.low else "high",
                           "chosen": best, "study_id": ext.study_id,
                           "report": os.path.relpath(ext.out_dir / "report.md", plan.out_dir)})
        tuned[group] = {stage.key: best}
        record["groups"][group] = {
            "chosen": best, "means": {str(v): m for v, m in sorted(means.items())},
            "per_seed": {str(v): dict(m) for v, m in sorted(per_seed.items())},
            "report": os.path.relpath(sub.out_dir / "report.md", plan.out_dir), "study_id": sub.study_id,
            "extensions": rounds, "stop": stop, "edge": edge_side(list(per_seed), best),
            "separation": separation(per_seed, best, plan.metric)}
    final = plan_study(plan.module, plan.argv, repeat_edit(tuned))
    write_tuning(final.out_dir / TUNING_FILE, record)
    if progress:
        print(f"ayt: stage 2: {final.study_id} repeats every group at its tuned {stage.key} "
              + ", ".join(f"{g}: {v[stage.key]:g}" for g, v in tuned.items()), flush=True)
    summary = run_study(final, progress=progress)
    summary["errors"] += failed
    summary["trials"] += trials
    return summary


def _tuning_metrics(sub: StudyPlan, parent_run_id: str, key: str) -> dict[float, dict[str, float]]:
    """A tuning round's metric at the study's endpoint per tried value and tuning seed, from its
    MLflow runs (the winner is chosen by it)."""
    out: dict[float, dict[str, float]] = {}
    for trial in load_trials(str(sub.base.tracking.uri), parent_run_id):
        if key in trial.axes:
            out.setdefault(float(trial.axes[key]), {})[trial.seed] = trial.score(sub.metric, sub.endpoint)
    return out


def _check_extension_values(plan: StudyPlan, stage: Any, labels: dict[str, Any]) -> None:
    """Before any trial: every value an extension round may try composes into a valid trial
    config (a linear range stepped past 0, say), or the field that allows it is named."""
    from ayt.studies.protocols.tune_then_repeat import extension_edit, extension_values
    values = extension_values(stage)
    if not values or not plan.tune_plans:
        return
    sub = plan.tune_plans[0]
    one = extension_edit(plan.space, stage, labels[sub.study["protocol"]["group"]], values[0], 0)

    def every(study: DictConfig) -> None:
        one(study)
        study.axes = {stage.key: list(values)}
    try:
        plan_study(plan.module, sub.argv, every)
    except ConfigError as err:
        raise ConfigError("study.protocol.tune.max_extensions",
                          f"an extension round may try {stage.key} in {values}, and one of them fails ({err}); "
                          "set study.protocol.tune.floor / ceiling, or lower max_extensions") from None


def run_search_then_confirm(plan: StudyPlan, progress: bool = True) -> dict[str, Any]:
    """Stage 1: the search as written; then the baseline on the search's seeds (unless
    `confirm.baseline_on_search_seeds` is false); stage 2: its best `confirm.k` and the baseline
    on the confirmation seeds (ayt/studies/protocols/search_then_confirm.py says why). Every stage resumes like any study."""
    stage = parse_confirm(plan.study, plan.space)
    uri = str(plan.base.tracking.uri)
    # A stage starting is an event: its line shows with or without the progress bar.
    print(f"ayt: stage 1: search {plan.study_id} ({plan.space.trial_count()} trials)", flush=True)
    searched = run_study(plan, progress=progress)
    trials = load_trials(uri, searched["parent_run_id"])
    candidates = choose_candidates(trials, plan.space, plan.metric, stage.k, plan.endpoint)
    if not candidates:
        raise StudyError(f"stage 1 of {plan.name}: no trial ran the whole budget with a finite "
                         f"{plan.study['metric']} (report {plan.out_dir / 'report.md'}); nothing to confirm")
    baseline_plan = baseline_search = None
    if stage.baseline_on_search_seeds:
        baseline_plan = plan_study(plan.module, plan.argv, baseline_edit(plan.space, stage))
        print(f"ayt: the baseline on the search seeds {list(plan.space.seeds)}: {baseline_plan.study_id}", flush=True)
        ran = run_study(baseline_plan, progress=progress)
        searched["errors"] += ran["errors"]
        searched["trials"] += ran["trials"]
        baseline_search = {t.seed: t.score(plan.metric, plan.endpoint)
                           for t in load_trials(uri, ran["parent_run_id"]) if t.status != "FAILED"}
    final = plan_study(plan.module, plan.argv, confirm_edit(plan.space, stage, candidates))
    write_confirmation(final.out_dir / CONFIRM_FILE,
                       confirmation_record(plan, stage, candidates, final.out_dir, len(trials), baseline_search,
                                           baseline_plan))
    print(f"ayt: stage 2: {final.study_id} runs the best {len(candidates)} and the baseline on seeds "
          f"{list(stage.seeds)}: " + "; ".join(f"{c.name} = {c.trial}" for c in candidates), flush=True)
    summary = run_study(final, progress=progress)
    summary["errors"] += searched["errors"]
    summary["trials"] += searched["trials"]
    summary["search_report"] = searched["report"]
    return summary


def rewrite_reports(plan: StudyPlan) -> list[str]:
    """The reports of a study that has run, written again from its MLflow runs (nothing trains,
    no run changes but its `report/` artifacts): after a change to what a report shows. A
    search_then_confirm study rewrites its confirmation stage too (its candidates follow from
    the search), a tune_then_repeat study its tuning stages."""
    from mlflow.tracking import MlflowClient

    from ayt.studies.report.write import write_report
    from ayt.tracking import RunLogger, find_run
    uri = str(plan.base.tracking.uri)
    client = MlflowClient(uri)

    def rewrite(stage: StudyPlan) -> str:
        experiment = client.get_experiment_by_name(str(stage.base.tracking.experiment))
        parent = find_run(client, experiment.experiment_id, stage.study_id) if experiment else None
        if parent is None:
            raise ConfigError("study", f"study {stage.study_id} has no MLflow parent run under {uri}: run it first")
        summary = write_report(stage, uri, parent.info.run_id)
        RunLogger(uri, parent.info.run_id).log_artifacts(summary["files"], artifact_path="report")
        return summary["report"]

    written = [rewrite(sub) for sub in plan.tune_plans] + [rewrite(plan)]
    if str(plan.study["protocol"]["name"]) == "search_then_confirm":
        stage = parse_confirm(plan.study, plan.space)
        experiment = client.get_experiment_by_name(str(plan.base.tracking.experiment))
        parent = find_run(client, experiment.experiment_id, plan.study_id)
        candidates = choose_candidates(load_trials(uri, parent.info.run_id), plan.space, plan.metric, stage.k,
                                       plan.endpoint)
        if stage.baseline_on_search_seeds:
            written.append(rewrite(plan_study(plan.module, plan.argv, baseline_edit(plan.space, stage))))
        written.append(rewrite(plan_study(plan.module, plan.argv, confirm_edit(plan.space, stage, candidates))))
    return written


PROTOCOL_RUNNERS = {"single": run_study, "tune_then_repeat": run_tune_then_repeat,
                    "search_then_confirm": run_search_then_confirm}


def _finished_trials(tuner) -> int:
    """Trials a restored study has already finished (they count as done on the progress bar)."""
    try:
        return sum(1 for r in tuner.get_results() if r.error is None and r.metrics and r.metrics.get("done"))
    except Exception:  # noqa: BLE001 - only the progress bar's start depends on it
        return 0


def _study_params(plan: StudyPlan) -> dict[str, Any]:
    study = dict(plan.study)
    study.pop("resume", None)
    # MLflow param names allow no "=" or ",": a tuned group `loss=mfd` becomes `loss:mfd`.
    study["tuned"] = {k.replace("=", ":").replace(",", " "): v for k, v in (study.get("tuned") or {}).items()}
    study["base_overrides"] = " ".join(plan.base_overrides)
    return study
