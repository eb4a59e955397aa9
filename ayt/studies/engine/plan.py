"""A study's plan: the study block and every trial config composed and validated from the
command line, before Ray starts (anything that can fail does so here), and the per-study
hooks that may adjust it (`study_hook`)."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ayt.artifacts import config_hash
from ayt.config import VOLATILE_KEYS, compose_config, load_config, run_name
from ayt.environ import env_read_by, environ
from ayt.errors import ConfigError
from ayt.eval.metrics import METRICS as METRIC_KINDS
from ayt.eval.metrics import direction as metric_direction
from ayt.eval.metrics import quantity_of
from ayt.metrics import eval_key
from ayt.studies.protocols import endpoint as endpoints
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.protocols.seed_plan import check as check_pilot
from ayt.studies.protocols.seed_rounds import check as check_seed_rounds
from ayt.studies.protocols.seed_rounds import enabled as seed_rounds_enabled
from ayt.studies.protocols.tune_then_repeat import (check_tuned, extension_values, groups, parse_tune_stage, protocol_name,
                                                    tune_edit, tuned_overrides)
from ayt.studies.engine import schema
from ayt.studies.protocols.search_then_confirm import baseline_overrides, is_confirm_protocol, parse_confirm
from ayt.studies.engine.space import StudySpace, check_axis_keys, check_not_derived, integer_ranges, parse_space


# A Ray Train trial's Tune actor only waits on its TorchTrainer, whose workers Ray Train
# places outside the trial's placement group. It reserves a token of memory, not CPU: Tune
# refuses an empty bundle, and even 0.01 CPU per trial driver would leave N trials of one
# 1-CPU worker each 0.01 CPU short of N CPUs, so one of them would wait with a core idle.
TRIAL_DRIVER_RESOURCES = {"memory": 16 * 1024 * 1024}


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
    env: dict[str, str | None] = field(default_factory=dict)        # the driver's values of the variables the config reads
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
    def optuna_db(self) -> Path:
        """The sqlite file of the Optuna study that OptunaSearch proposes trials from."""
        return self.out_dir / "optuna.db"

    @property
    def metric(self) -> str:
        """The metric Optuna and ASHA optimise, as trials report it (`eval/fid_1step`)."""
        return eval_key(str(self.study["metric"]))

    @property
    def endpoint(self) -> Endpoint:
        """How a trial's curve becomes its one score (`study.endpoint`, ayt/studies/protocols/endpoint.py)."""
        return endpoints.of(self.study)

    @property
    def tune_metric(self) -> str:
        """What Tune's scheduler and Optuna's sampler rank by: the study metric at its endpoint of
        the curve so far, as each trial's reports carry it (the metric itself at `final`)."""
        return self.endpoint.tune_key(self.metric)

    @property
    def mode(self) -> str:
        """Which way the study metric is better: Tune's `mode` (min | max, the metric's declaration)."""
        return metric_direction(self.metric)

    @property
    def trial_backend(self) -> str:
        """in_process (the trial trains in its Tune actor) or ray_train (a TorchTrainer)."""
        chosen = str(self.study["trial_backend"])
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
        """A trial's config as the driver resolves it: paths against the driver's directory (a
        Tune trial runs in a directory of its own), `${oc.env:...}` with the driver's values (a
        trial on another node has not got AYT_TRACKING_URI, AYT_CACHE, ... in its environment)."""
        with environ(self.env):
            cfg = load_config(self.trial_overrides(params, trial_id), base_dir=self.base_dir or None)
            OmegaConf.resolve(cfg)                 # now, not when a key is read on the worker
        return cfg

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


# ---- how many trials a plan runs ------------------------------------------------------------

@dataclass(frozen=True)
class TrialCount:
    """The trials a plan runs per stage, as (at least, at most): they differ where a stage
    stops early by design (a tuning range's extension rounds, seeds added in rounds, a
    confirmation of fewer candidates than asked for)."""

    stages: dict[str, tuple[int, int]]

    @property
    def least(self) -> int:
        return sum(low for low, _ in self.stages.values())

    @property
    def most(self) -> int:
        return sum(high for _, high in self.stages.values())

    def summary(self) -> dict[str, Any]:
        """Stage -> count (`10 to 20` where it varies), and the total: what `--cfg` prints."""
        shown = {**self.stages, "total": (self.least, self.most)}
        return {stage: low if low == high else f"{low} to {high}" for stage, (low, high) in shown.items()}

    def words(self) -> str:
        """`16 trials`, or `26 to 52 trials (tuning 16, extension rounds 0 to 16, repeat 10 to 20)`."""
        shown = self.summary()
        total = shown.pop("total")
        return f"{total} trials" + ("" if list(shown) == ["study"] else
                                    " (" + ", ".join(f"{stage} {n}" for stage, n in shown.items()) + ")")


def trial_count(plan: StudyPlan) -> TrialCount:
    """Every stage the plan's protocol runs: tune_then_repeat's tuning, its extension rounds
    (each grid value past either edge, on every tuning seed, for every group) and its repeat;
    search_then_confirm's search and confirmation (its best `k` and the baseline on each
    confirmation seed); seed rounds from the first round's seeds to every seed listed."""
    space, study = plan.space, plan.study
    written = space.trial_count()
    if seed_rounds_enabled(study):
        first = int(study["seed_rounds"]["first"])
        main = (written // len(space.seeds) * first, written)
    else:
        main = (written, written)
    if protocol_name(study) == "tune_then_repeat" and plan.tune_plans:
        stage = parse_tune_stage(study, space)
        tuning = sum(sub.space.trial_count() for sub in plan.tune_plans)
        extensions = len(extension_values(stage)) * len(stage.seeds) * len(plan.tune_plans)
        return TrialCount({"tuning": (tuning, tuning), "extension rounds": (0, extensions), "repeat": main})
    if is_confirm_protocol(study):
        stage = parse_confirm(study, space)
        base = len(space.seeds) if stage.baseline_on_search_seeds else 0
        return TrialCount({"search": main, **({"baseline on the search seeds": (base, base)} if base else {}),
                           "confirmation": (2 * len(stage.seeds), (stage.k + 1) * len(stage.seeds))})
    return TrialCount({"study": main})


# ---- per-study hooks ------------------------------------------------------------------------

STUDY_HOOKS: dict[str, Callable[[StudyPlan], None]] = {}


def study_hook(name: str):
    """Register a per-study adjustment of the plan (e.g. drop an axis value that cannot run)."""
    def register(fn: Callable[[StudyPlan], None]):
        STUDY_HOOKS[name] = fn
        return fn
    return register


# ---- planning: everything that can fail does so here, before Ray ---------------------------

def split_argv(argv: Sequence[str]) -> list[str]:
    """`resume=true` is shorthand for `study.resume=true`."""
    return [("study." + a) if a.startswith("resume=") else a for a in argv]


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
    resolved = OmegaConf.to_container(study, resolve=True)
    schema.validate(resolved)                      # every field's own check, once
    space = parse_space(study)
    endpoints.check(resolved, space.evals)
    _check_not_derived(study, train_args)
    check_tuned(study, space)
    check_seed_rounds(resolved, space)
    base_overrides = []
    if study.preset and not any(a.split("=", 1)[0].lstrip("+") == "experiment" for a in train_args):
        base_overrides.append(f"experiment={study.preset}")
    base_overrides += [str(o) for o in (study.fixed or [])]
    if not any(a.startswith("tracking.experiment=") for a in train_args):
        base_overrides.append(f"tracking.experiment={space.name}")
    base_overrides += train_args
    base_dir = os.getcwd()
    check_pilot(resolved, base_dir)                # study.detect, study.pilot: before any work
    base = load_config(base_overrides, base_dir=base_dir)
    check_axis_keys(space, base)
    check_study_metric(str(study.metric), base)
    integer_ranges(space, base, lambda key, value: _takes_fractions(base_overrides, base_dir, key, value))
    if str(study.trial_backend) == "in_process" and int(base.scaling.num_workers) != 1:
        raise ConfigError("study.trial_backend", f"in_process trains one worker per trial, but "
                          f"scaling.num_workers={base.scaling.num_workers}; use auto or ray_train")
    # The identity of a study: what its trials compute, not where or how fast they run.
    spec = {"study": schema.identity(resolved),
            "base": OmegaConf.to_container(base, resolve=True)}
    for volatile in VOLATILE_KEYS:
        spec["base"].pop(volatile, None)
    plan = StudyPlan(name=space.name, module=name, study=resolved, space=space,
                     base_overrides=base_overrides, base=base, study_id=f"{space.name}-{config_hash(spec, 8)}",
                     argv=list(argv), base_dir=base_dir,
                     env=env_read_by(OmegaConf.to_yaml(compose_config(base_overrides))))
    _validate_scheduler(plan)
    _load_study_module(name)
    hook = STUDY_HOOKS.get(name)
    if hook is not None:
        hook(plan)
    plan.trial_configs = [plan.trial_config(p) for p in _validation_points(plan)]
    if edit is None and is_confirm_protocol(plan.study):
        _check_baseline(plan, parse_confirm(plan.study, space))
    if protocol_name(plan.study) == "tune_then_repeat" and not plan.study.get("tuned"):
        stage = parse_tune_stage(plan.study, space)
        if not any(a.split("=", 1)[0] == "tracking.experiment" for a in train_args):
            argv = [*argv, f"tracking.experiment={space.name}-tune"]
        plan.tune_plans = [plan_study(name, argv, tune_edit(space, stage, g)) for g in groups(space)]
    return plan


def _check_not_derived(study: DictConfig, train_args: Sequence[str]) -> None:
    """No value, wherever it is given, for a key the study sets on every trial itself
    (`space.DERIVED_KEYS`: the budget's schedule, the seed, the run name); axes: `parse_space`."""
    def key_of(item: Any) -> str:
        return str(item).partition("=")[0].lstrip("+~")
    for item in study.fixed or []:
        check_not_derived(key_of(item), "study.fixed")
    for item in train_args:
        check_not_derived(key_of(item), key_of(item))
    for label, values in (study.get("tuned") or {}).items():
        for key in values or {}:
            check_not_derived(str(key), f"study.tuned.{label}")
    for name, settings in (study.get("candidates") or {}).items():
        for key in settings or {}:
            check_not_derived(str(key), f"study.candidates.{name}")
    if protocol_name(study) == "tune_then_repeat":
        check_not_derived(str(study.protocol.tune.key), "study.protocol.tune.key")


def _takes_fractions(base_overrides: Sequence[str], base_dir: str, key: str, value: float) -> bool:
    """Whether the config's own checks take a fraction for `key` (they name it when they want an integer)."""
    try:
        load_config([*base_overrides, f"{key}={value!r}"], base_dir=base_dir)
    except ConfigError as err:
        return not (err.field == key and "integer" in err.message)
    return True


def check_study_metric(metric: str, base: DictConfig) -> None:
    """`study.metric` is logged by a metric the trials evaluate (`eval.metrics`)."""
    quantity = quantity_of(metric)
    evaluated = [str(m) for m in base.eval.metrics]
    if not any(quantity in METRIC_KINDS[m].quantities for m in evaluated):
        owner = next(name for name, kind in METRIC_KINDS.items() if quantity in kind.quantities)
        raise ConfigError("study.metric", f"{metric!r} is logged by metric {owner!r}, which eval.metrics "
                          f"{evaluated} does not evaluate; add it (e.g. eval.metrics=[{', '.join([*evaluated, owner])}]) "
                          "or rank by one of theirs")


def _load_study_module(name: str) -> None:
    """Import ayt.studies.<name> so its hooks register (a study may be only a yaml)."""
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


def _check_baseline(plan: StudyPlan, stage) -> None:
    """search_then_confirm's baseline composes into a valid trial config (a bad value fails now,
    not after the search)."""
    overrides = baseline_overrides(stage)
    if not overrides:
        return
    try:
        load_config([*plan.base_overrides, *overrides], base_dir=plan.base_dir or None)
    except ConfigError as err:
        raise ConfigError("study.protocol.confirm.baseline", f"{' '.join(overrides)}: {err}") from None


def _validate_scheduler(plan: StudyPlan) -> None:
    """ASHA's rungs in evaluations: grace_evals, grace_evals x reduction_factor, ... below the
    budget; with none below it, ASHA would stop no trial."""
    study = plan.study
    if study["scheduler"] != "asha":
        return
    grace, factor, evals = study["asha"]["grace_evals"], float(study["asha"]["reduction_factor"]), plan.space.evals
    if grace >= evals:        # its type and lower bound: the schema
        raise ConfigError("study.asha.grace_evals", f"must be an integer in [1, study.budget.evals - 1 = "
                          f"{evals - 1}] (ASHA decides at evaluations before the last), got {grace!r}")
    if plan.space.trial_count() < factor:
        raise ConfigError("study.asha.reduction_factor", f"keeps 1/{factor:g} of the trials at each rung, but the "
                          f"study has {plan.space.trial_count()} trials: ASHA would stop none; lower it or add trials")

