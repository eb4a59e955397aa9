"""The shared study runner: every study module is a search space in `conf/study/<name>.yaml`
plus a call to `study_main(name)`.

    CLI overrides -> plan (compose + validate the study and every trial config; no Ray yet)
      -> Ray (+ preflight) -> shared artifacts built once per distinct setting
      -> Tuner(function trainable -> TorchTrainer per trial, OptunaSearch, optional ASHA)
      -> StudyTracker (driver): parent MLflow run + one child per trial
      -> report (markdown + PNGs + CSV) under out_dir/<study>/, logged to the parent run

`resume=true` on the same out_dir and study config restores the Tuner: finished trials stay
finished, unfinished ones continue from their Ray Train checkpoints, and the tracker finds
their MLflow child runs again instead of creating new ones.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ayt.artifacts import config_hash
from ayt.config import VOLATILE_KEYS, compose_config, flatten, load_config, run_name
from ayt.errors import ConfigError
from ayt.metrics import eval_key
from ayt.provenance import CODE_VERSIONS_TAG, code_version, short_version
from ayt.studies.critical_batch import check_critical_batch
from ayt.studies.protocol import (TUNING_FILE, check_tuned, choose, groups, parse_tune_stage, protocol_name,
                                  repeat_edit, tune_edit, tuned_overrides, write_tuning)
from ayt.studies.space import SCHEDULERS, StudySpace, check_axis_keys, parse_space

log = logging.getLogger(__name__)

# A Ray Train trial's Tune actor only waits on its TorchTrainer, whose workers Ray Train
# places outside the trial's placement group. It reserves a token of memory, not CPU: Tune
# refuses an empty bundle, and even 0.01 CPU per trial driver would leave N trials of one
# 1-CPU worker each 0.01 CPU short of N CPUs, so one of them would wait with a core idle.
TRIAL_DRIVER_RESOURCES = {"memory": 16 * 1024 * 1024}
TRIAL_BACKENDS = ("auto", "in_process", "ray_train")
# Study keys that change how a study runs or is reported, not what its trials compute.
VOLATILE_STUDY_KEYS = ("resume", "max_concurrent_trials", "max_failures", "trial_backend", "critical_batch",
                       "tuned_source", "allow_code_change")


@dataclass
class StudyPlan:
    """Everything a study needs, resolved and validated before Ray starts."""

    name: str                              # study.name: MLflow experiment, report directory
    module: str                            # the study module (ayt.studies.<module>) and conf/study/<module>.yaml
    study: dict[str, Any]                  # the study block, resolved
    space: StudySpace
    base_overrides: list[str]              # every trial starts from these
    base: DictConfig                       # the validated base trial config
    study_id: str                          # name + hash of what defines the study
    argv: list[str] = field(default_factory=list)                   # the command line it came from
    base_dir: str = ""                     # the driver's working directory: relative paths resolve here
    trial_configs: list[DictConfig] = field(default_factory=list)   # grid: every trial; else the corners
    skipped: list[str] = field(default_factory=list)                # axis values a study hook dropped, and why
    tune_plans: list["StudyPlan"] = field(default_factory=list)     # tune_then_repeat: stage 1, one per group

    @property
    def out_dir(self) -> Path:
        return Path(self.base.out_dir) / self.name

    @property
    def storage_path(self) -> str:
        return str(self.base.ray.storage_path)

    @property
    def experiment_path(self) -> str:
        return _join(self.storage_path, self.study_id)

    @property
    def metric(self) -> str:
        """The metric Optuna and ASHA minimise, as trials report it (`eval/fid_1step`)."""
        return eval_key(str(self.study["metric"]))

    @property
    def trial_backend(self) -> str:
        """in_process (the trial trains in its Tune actor) or ray_train (a TorchTrainer)."""
        chosen = str(self.study.get("trial_backend") or "auto")
        if chosen == "auto":
            return "in_process" if int(self.base.scaling.num_workers) == 1 else "ray_train"
        return chosen

    def trial_resources(self):
        """What a Tune trial reserves: its one worker's bundle when it trains in process, a
        token otherwise (Ray Train reserves the workers)."""
        from ray import tune
        if self.trial_backend == "in_process":
            from ayt.preflight import worker_bundle
            return tune.PlacementGroupFactory([worker_bundle(self.base)])
        return TRIAL_DRIVER_RESOURCES

    def trial_overrides(self, params: dict[str, Any], trial_id: str | None) -> list[str]:
        batch = int(params.get("batch_size", self.base.batch_size))
        extra = [f"name={self.study_id}-{trial_id}"] if trial_id else []
        return [*self.base_overrides, *self.space.overrides(params, batch),
                *tuned_overrides(self.study, self.space, params), *extra,
                f"ray.storage_path={_join(self.storage_path, self.study_id, 'trials')}",
                "scaling.backend=ray", "progress=false"]

    def trial_config(self, params: dict[str, Any], trial_id: str | None = None) -> DictConfig:
        """A trial's config, its paths resolved against the driver's directory (a Tune trial
        runs in a directory of its own)."""
        return load_config(self.trial_overrides(params, trial_id), base_dir=self.base_dir or None)

    def label(self, trial) -> str:
        """The trial's readable name (`b16-mfd-s0-57f9`): console, report and MLflow run name."""
        return self.space.label(trial.config, trial.trial_id)

    def describe(self, trial) -> "TrialRecord":
        """How the tracker records a Tune trial in MLflow."""
        cfg = self.trial_config(trial.config, trial.trial_id)
        name = run_name(cfg)
        from ayt.training.prepare import artifact_record
        params = {**_run_params(cfg), **{f"axis.{k}": v for k, v in trial.config.items()},
                  **{f"artifact.{k}": v for k, v in artifact_record(cfg).items()}}
        return TrialRecord(name, self.label(trial), params, int(cfg.training.iterations),
                           Path(cfg.out_dir) / "runs" / name, {"ayt.study_id": self.study_id})


@dataclass(frozen=True)
class TrialRecord:
    """A Tune trial as the study's MLflow writer records it."""

    key: str                    # stable and unique (study id + Tune trial id): finds the run again on resume
    label: str                  # what a person reads: the MLflow run name
    params: dict[str, Any]
    planned_iterations: int
    run_dir: Path               # where the trial writes its artifacts
    tags: dict[str, str]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _run_params(cfg: DictConfig) -> dict[str, Any]:
    from ayt.train import run_params
    return run_params(cfg)


# ---- planning: everything that can fail does so here, before Ray ---------------------------

def split_argv(argv: Sequence[str]) -> list[str]:
    """`resume=true` is shorthand for `study.resume=true`."""
    return [("study." + a) if a.split("=", 1)[0] == "resume" else a for a in argv]


def plan_study(name: str, argv: Sequence[str] = (), edit: Callable[[DictConfig], None] | None = None) -> StudyPlan:
    """Compose and validate study `name` with CLI overrides; `edit` adjusts the composed study
    block first (how a protocol derives its stages from the study as written)."""
    argv = split_argv(argv)
    study_args = [a for a in argv if a.lstrip("+~").startswith("study.")]
    train_args = [a for a in argv if a not in study_args]
    composed = compose_config([f"+study={name}", *study_args, *train_args])
    study = composed.study
    if edit is None and protocol_name(study) == "tune_then_repeat" and study.get("tuned"):
        raise ConfigError("study.tuned", "tune_then_repeat chooses it in stage 1 and would skip that stage; "
                          "remove it, or run hand-set values with study.protocol.name=single")
    if edit is not None:
        with open_dict(study):
            edit(study)
    for key in ("metric", "scheduler", "max_failures", "preset"):
        if key not in study:
            raise ConfigError(f"study.{key}", "missing from the study config")
    if str(study.scheduler) not in SCHEDULERS:
        raise ConfigError("study.scheduler", f"unknown value {study.scheduler!r}; allowed: " + ", ".join(SCHEDULERS))
    if str(study.metric) not in ("fid_1step", "fid_2step"):
        raise ConfigError("study.metric", f"unknown value {study.metric!r}; allowed: fid_1step, fid_2step")
    if str(study.get("trial_backend", "auto")) not in TRIAL_BACKENDS:
        raise ConfigError("study.trial_backend", f"unknown value {study.trial_backend!r}; allowed: "
                          + ", ".join(TRIAL_BACKENDS))
    space = parse_space(study)
    check_tuned(study, space)
    check_critical_batch(study)
    base_overrides = []
    if study.preset and not any(a.split("=", 1)[0].lstrip("+") == "experiment" for a in train_args):
        base_overrides.append(f"experiment={study.preset}")
    base_overrides += [str(o) for o in (study.fixed or [])]
    if not any(a.startswith("tracking.experiment=") for a in train_args):
        base_overrides.append(f"tracking.experiment={space.name}")
    base_overrides += train_args
    base_dir = os.getcwd()
    base = load_config(base_overrides, base_dir=base_dir)
    check_axis_keys(space, base)
    if str(study.get("trial_backend")) == "in_process" and int(base.scaling.num_workers) != 1:
        raise ConfigError("study.trial_backend", f"in_process trains one worker per trial, but "
                          f"scaling.num_workers={base.scaling.num_workers}; use auto or ray_train")
    # The identity of a study: what its trials compute, not where or how fast they run.
    spec = {"study": OmegaConf.to_container(study, resolve=True), "base": OmegaConf.to_container(base, resolve=True)}
    for volatile in VOLATILE_STUDY_KEYS:
        spec["study"].pop(volatile, None)
    for volatile in VOLATILE_KEYS:
        spec["base"].pop(volatile, None)
    plan = StudyPlan(name=space.name, module=name, study=OmegaConf.to_container(study, resolve=True), space=space,
                     base_overrides=base_overrides, base=base, study_id=f"{space.name}-{config_hash(spec, 8)}",
                     argv=list(argv), base_dir=base_dir)
    _validate_scheduler(plan)
    _load_study_module(name)
    hook = STUDY_HOOKS.get(name)
    if hook is not None:
        hook(plan)
    plan.trial_configs = [plan.trial_config(p) for p in _validation_points(plan)]
    if protocol_name(plan.study) == "tune_then_repeat" and not plan.study.get("tuned"):
        stage = parse_tune_stage(plan.study, space)
        if not any(a.split("=", 1)[0] == "tracking.experiment" for a in train_args):
            argv = [*argv, f"tracking.experiment={space.name}-tune"]
        plan.tune_plans = [plan_study(name, argv, tune_edit(space, stage, g)) for g in groups(space)]
    return plan


def _load_study_module(name: str) -> None:
    """Import ayt.studies.<name> so its hooks register (a study may be only a yaml)."""
    import importlib
    try:
        importlib.import_module(f"ayt.studies.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"ayt.studies.{name}":
            raise


def _validation_points(plan: StudyPlan) -> list[dict[str, Any]]:
    """Grid: every point. Sampled: each axis at its corners, the others at their first value."""
    space = plan.space
    if space.search == "grid":
        return space.grid()
    first = {a.param: a.corners()[0] for a in space.all_axes}
    points = [first]
    for axis in space.all_axes:
        points += [{**first, axis.param: v} for v in axis.corners()[1:]]
    return points


def _validate_scheduler(plan: StudyPlan) -> None:
    study = plan.study
    if study["scheduler"] != "asha":
        return
    asha = study.get("asha") or {}
    grace, rf = asha.get("grace_evals", 1), asha.get("reduction_factor", 2)
    if not isinstance(grace, int) or not 1 <= grace <= plan.space.evals:
        raise ConfigError("study.asha.grace_evals", f"must be an integer in [1, study.budget.evals="
                          f"{plan.space.evals}], got {grace!r}")
    if not isinstance(rf, (int, float)) or rf <= 1:
        raise ConfigError("study.asha.reduction_factor", f"must be a number > 1, got {rf!r}")


# ---- running ---------------------------------------------------------------------------------

def run_trial(config: dict[str, Any], plan: StudyPlan) -> None:
    """The Tune function trainable. Its config is resolved against the driver's directory, so
    it finds the artifacts the driver built and writes where the tracker looks."""
    from ray import tune

    from ayt.training.prepare import ensure_artifacts
    cfg = plan.trial_config(config, tune.get_context().get_trial_id())
    artifacts = ensure_artifacts(cfg, progress=False)       # cached: built before the study, or once here
    TRIAL_RUNNERS[plan.trial_backend](cfg, artifacts)


def _train_in_process(cfg: DictConfig, artifacts) -> None:
    from ayt.training.tune_trial import train_in_trial
    train_in_trial(cfg, artifacts)


def _train_with_ray_train(cfg: DictConfig, artifacts) -> None:
    """One TorchTrainer per trial. Worker reports reach Tune through TuneReportCallback; the
    trial's stable name lets a retried or restored trial resume from its last Ray Train
    checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ayt.training.ray_train import build_trainer, raise_if_failed
    trainer = build_trainer(cfg, artifacts, None, run_name(cfg), progress=False, callbacks=[TuneReportCallback()])
    trainer.fit()
    raise_if_failed(cfg, run_name(cfg))


TRIAL_RUNNERS = {"in_process": _train_in_process, "ray_train": _train_with_ray_train}


def prebuild_artifacts(plan: StudyPlan, progress: bool = True) -> int:
    """Build each distinct shared artifact once, on the driver, before any trial starts."""
    from ayt.training.prepare import classifier_spec, ensure_artifacts, feature_map_spec, needs_feature_map, \
        pretrained_spec
    seen: set[str] = set()
    for cfg in plan.trial_configs:
        key = config_hash([pretrained_spec(cfg), feature_map_spec(cfg) if needs_feature_map(cfg) else None,
                           classifier_spec(cfg)])
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

    from ayt.preflight import worker_bundle
    available = ray.cluster_resources()
    per_trial = {k: v * int(plan.base.scaling.num_workers) for k, v in worker_bundle(plan.base).items()}
    fits = [available.get(k, 0.0) / v for k, v in per_trial.items() if v > 0]
    return max(1, int(min(fits))) if fits else 1


def _searcher(plan: StudyPlan):
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    space, seed = plan.space, int(plan.study.get("sampler_seed", 0))
    if space.search == "grid":
        sampler = optuna.samplers.GridSampler(space.grid_space(), seed=seed)
    elif space.search == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{plan.out_dir / 'optuna.db'}")
    return OptunaSearch(space=space.define_by_run, metric=plan.metric, mode="min", sampler=sampler,
                        study_name=plan.study_id, storage=storage)


def _scheduler(plan: StudyPlan):
    if plan.study["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler
    asha = plan.study.get("asha") or {}
    batches = [int(c.batch_size) for c in plan.trial_configs] or [int(plan.base.batch_size)]
    max_t = plan.space.max_images(batches)
    grace = max_t // plan.space.evals * int(asha.get("grace_evals", 1))
    return ASHAScheduler(time_attr="images_seen", metric=plan.metric, mode="min", max_t=max_t,
                         grace_period=grace, reduction_factor=float(asha.get("reduction_factor", 2)))


def _experiment_exists(plan: StudyPlan) -> bool:
    path = plan.experiment_path
    if "://" in path:
        import pyarrow.fs
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.get_file_info(inner + "/tuner.pkl").type != pyarrow.fs.FileType.NotFound
    return (Path(path) / "tuner.pkl").exists()


def requeue_orphaned_trials(plan: StudyPlan, parent_run_id: str | None = None) -> int:
    """Before a resume: Optuna trials the killed driver had asked for but Tune never saved.

    Tune saves its searcher after each step; a driver killed between the searcher's `ask`
    and that save leaves an Optuna trial RUNNING that no Tune trial owns. The resumed study
    would never finish it, and Optuna's GridSampler would hand out a duplicate instead. Each
    such trial is failed and queued again with its grid point (Optuna's own
    retry callback), so the resumed study runs every point exactly once; an MLflow
    child run that such a trial had opened is deleted (soft: `mlflow runs restore` undoes it),
    since its retry opens its own. Returns the number of trials re-queued."""
    import optuna
    from optuna.trial import TrialState
    db = plan.out_dir / "optuna.db"
    saved = _latest_searcher_state(plan.experiment_path)
    if saved is None or not db.exists():
        return 0
    owned = saved.get("_ot_trials") if isinstance(saved, dict) else None
    if not isinstance(owned, dict) or not all(hasattr(t, "_trial_id") for t in owned.values()):
        # OptunaSearch's saved state is private to Ray; if its shape changed, re-queueing
        # "every running trial" would duplicate work. Stop and say so instead.
        raise ConfigError("study.resume", "cannot read Ray Tune's saved OptunaSearch state (its format changed "
                          f"in ray {_ray_version()}); resume is not safe with this Ray version")
    owned_ids = {t._trial_id for t in owned.values()}
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{db}")
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t._trial_id not in owned_ids]
    with warnings.catch_warnings():          # renamed in Optuna 4.9 (and marked experimental)
        warnings.simplefilter("ignore")
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                        optuna.storages.RetryFailedTrialCallback)(max_retry=None)
    for trial in orphans:
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))
        point = trial.params or (f"grid point {trial.system_attrs['grid_id']}" if "grid_id" in trial.system_attrs
                                 else "before it had parameters")
        log.warning("study %s: Optuna trial %d was asked for but never saved by Tune; queued again (%s)",
                    plan.study_id, trial.number, point)
    if parent_run_id:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(str(plan.base.tracking.uri))
        for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
            if run.data.tags.get("ayt.trial_id") not in owned:
                client.delete_run(run.info.run_id)
                log.warning("study %s: deleted MLflow run %s of a trial Tune never saved", plan.study_id,
                            run.info.run_id)
    return len(orphans)


def _ray_version() -> str:
    import ray
    return ray.__version__


def _latest_searcher_state(experiment_path: str) -> dict | None:
    """The newest `searcher-state-*.pkl` Tune saved, read through the filesystem layer Ray
    uses for its storage (local paths, s3://, gs://)."""
    import pickle

    import pyarrow.fs
    fs, root = pyarrow.fs.FileSystem.from_uri(experiment_path) if "://" in experiment_path else \
        (pyarrow.fs.LocalFileSystem(), str(Path(experiment_path).absolute()))
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    states = sorted(i.path for i in infos if i.base_name.startswith("searcher-state-") and i.path.endswith(".pkl"))
    if not states:
        return None
    with fs.open_input_stream(states[-1]) as f:
        return pickle.loads(f.read())


def run_study(plan: StudyPlan, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a planned study; returns the report summary."""
    from ray import tune

    from ayt.studies.console import StudyConsole
    from ayt.studies.report import write_report
    from ayt.studies.tracker import StudyTracker
    from ayt.tracking import RunLogger, start_or_resume_run
    from ayt.training.ray_train import connect

    resume = bool(plan.study.get("resume"))
    exists = _experiment_exists(plan)
    if exists and not resume:
        raise ConfigError("study.resume", f"study {plan.study_id} already exists under {plan.experiment_path}; "
                          "pass resume=true to finish it, or change study.name")
    if resume and not exists:
        log.info("resume=true but no earlier study %s: starting it", plan.study_id)
    uri = str(plan.base.tracking.uri)
    if exists:
        check_code_version(plan, uri)
    connect(plan.base)                            # Ray + preflight, before any artifact or trial
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"   # a failed trial's last report has no FID
    # MLflow is the record (StudyTracker); Tune's JSON/CSV/TensorBoard files would only repeat it.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not plan.base.get("verbose"):
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")     # Tune's new reporter prints even at verbose=0
    # Save Tune's experiment state at every step (cheap at study sizes) so a killed driver
    # loses as little as possible: a trial finished but not yet saved restarts from its final
    # checkpoint and trains nothing.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
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
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), plan.trial_resources())
    if exists:
        requeue_orphaned_trials(plan, parent_id)
    try:
        if exists:
            tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            console.done = _finished_trials(tuner)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=_searcher(plan), scheduler=_scheduler(plan),
                                            num_samples=plan.space.trial_count(),
                                            max_concurrent_trials=max_concurrent_trials(plan),
                                            # In-process trials keep torch, the data and the FID
                                            # extractor loaded from one trial to the next.
                                            reuse_actors=plan.trial_backend == "in_process"),
                run_config=tune.RunConfig(name=plan.study_id, storage_path=plan.storage_path,
                                          callbacks=[tracker, console],
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                          failure_config=tune.FailureConfig(max_failures=int(plan.study["max_failures"])),
                                          verbose=2 if plan.base.get("verbose") else 0))
        grid = tuner.fit()
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
    seen = [v for v in (tags.get(CODE_VERSIONS_TAG) or tags.get("ayt.code_version") or
                        tags.get("ayt.git_commit") or "").split(",") if v]
    if not seen or seen[-1] == now:
        return
    if not plan.study.get("allow_code_change"):
        raise ConfigError("study.resume", f"study {plan.study_id} ran on code {short_version(seen[-1])}, this "
                          f"checkout is {short_version(now)}: its trials would be trained by different code; "
                          "pass study.allow_code_change=true to resume anyway (each trial records its code)")
    log.warning("study %s: resuming on code %s (it ran on %s)", plan.study_id, now, ", ".join(seen))


def run_tune_then_repeat(plan: StudyPlan, progress: bool = True) -> dict[str, Any]:
    """Stage 1: each group's tuning study; stage 2: the study at each group's best value
    (ayt/studies/protocol.py says why). Every stage resumes like any study."""
    from ayt.studies.report import load_trials
    stage = parse_tune_stage(plan.study, plan.space)
    uri = str(plan.base.tracking.uri)
    tuned: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {"key": stage.key, "low": stage.low, "high": stage.high, "log": stage.log,
                              "search": stage.search, "seeds": list(stage.seeds), "metric": str(plan.study["metric"]),
                              "groups": {}}
    failed = 0
    for index, sub in enumerate(plan.tune_plans, 1):
        group = sub.study["protocol"]["group"]
        if progress:
            print(f"ayt: stage 1 ({index}/{len(plan.tune_plans)}): tuning {stage.key} for {group} "
                  f"(study {sub.study_id}, {sub.space.trial_count()} trials)", flush=True)
        summary = run_study(sub, progress=progress)
        failed += summary["errors"]
        by_value: dict[float, list[float]] = {}
        for trial in load_trials(uri, summary["parent_run_id"]):
            if stage.key in trial.axes:
                by_value.setdefault(float(trial.axes[stage.key]), []).append(trial.final(sub.metric))
        best, means = choose(by_value)
        if best is None:
            raise StudyError(f"stage 1 of {plan.name}: every trial tuning {stage.key} for {group} failed "
                             f"(report {sub.out_dir / 'report.md'})")
        tuned[group] = {stage.key: best}
        record["groups"][group] = {"chosen": best, "means": {str(v): m for v, m in means.items()},
                                   "report": os.path.relpath(sub.out_dir / "report.md", plan.out_dir),
                                   "study_id": sub.study_id}
    final = plan_study(plan.module, plan.argv, repeat_edit(tuned))
    write_tuning(final.out_dir / TUNING_FILE, record)
    if progress:
        print(f"ayt: stage 2: {final.study_id} repeats every group at its tuned {stage.key} "
              + ", ".join(f"{g}: {v[stage.key]:g}" for g, v in tuned.items()), flush=True)
    summary = run_study(final, progress=progress)
    summary["errors"] += failed
    summary["trials"] += sum(sub.space.trial_count() for sub in plan.tune_plans)
    return summary


class StudyError(RuntimeError):
    """A study cannot go on (not a config problem): the reason, in one line."""


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


# ---- hooks and CLI ---------------------------------------------------------------------------

STUDY_HOOKS: dict[str, Callable[[StudyPlan], None]] = {}


def study_hook(name: str):
    """Register a per-study adjustment of the plan (e.g. drop an axis value that cannot run)."""
    def register(fn: Callable[[StudyPlan], None]):
        STUDY_HOOKS[name] = fn
        return fn
    return register


USAGE = """usage: python -m ayt.studies.{name} [resume=true] [study.KEY=VALUE ...] [TRAIN_OVERRIDE ...]

Study keys (conf/study/{name}.yaml): study.axes.*, study.seeds, study.budget.amount,
study.budget.unit (images|iterations), study.budget.evals, study.scheduler (none|asha),
study.search (grid|tpe|random), study.num_samples, study.max_concurrent_trials.
Any other key=value applies to every trial (e.g. out_dir=/tmp/ayt scaling.num_workers=2)."""


def study_main(name: str, argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(name=name))
        return 0
    dry_run = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    try:
        plan = plan_study(name, args)
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print(OmegaConf.to_yaml({"study": plan.study, "study_id": plan.study_id, "trials": plan.space.trial_count(),
                                 "base_overrides": plan.base_overrides}))
        return 0
    from ayt.preflight import check_locations
    from ayt.logs import route_logs
    try:
        check_locations(plan.base)         # every path and address, before Ray or MLflow
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ayt").setLevel(logging.INFO)
    log_file = route_logs(plan.out_dir / "logs" / "study.log", verbose=bool(plan.base.get("verbose")))
    print(f"ayt: study {plan.study_id}: {plan.space.trial_count()} trials; Ray/Tune logs in {log_file}", flush=True)
    try:
        runner = run_tune_then_repeat if plan.tune_plans else run_study
        summary = runner(plan, progress=bool(plan.base.progress))
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    except StudyError as err:
        print(f"ayt: study error: {err}", file=sys.stderr)
        return 1
    print(f"ayt: study {plan.study_id}: {summary['trials']} trials ({summary['errors']} failed); "
          f"report {summary['report']}; MLflow parent run {summary['parent_run_id']}")
    return 0 if summary["errors"] == 0 else 1
