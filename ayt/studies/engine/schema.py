"""The study block's one schema: every field's type, default, check and role, declared once.

Hydra composes `study` onto this schema (registered with its ConfigStore as `study/schema`,
which `conf/study/base.yaml` extends), so a key that is not declared here, or a value of the
wrong type, fails at composition naming the field. What a dataclass type cannot say is a
`spec(...)` on the field: `doc` (the usage text), `choices`, `minimum` (each item of a list),
`nonempty`, and `defines` — whether the field is part of what the study computes (and so of
its id) or only of how it runs and is reported. The volatile keys, the usage text and the
per-field checks are derived from those declarations; checks that relate several fields
(a budget that splits into every batch size, tuning seeds apart from the repeat seeds) stay
with the code that gives them meaning (`space`, `protocol`, `plan`).

A new study option is one field here (and, when it needs one, the line of code that reads it).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

from hydra.core.config_store import ConfigStore

from ayt.errors import ConfigError
from ayt.eval.metrics import study_metrics
from ayt.studies.protocols.endpoint import ENDPOINTS

SEARCHES = ("grid", "tpe", "random", "gp")
SCHEDULERS = ("none", "asha")
BUDGET_UNITS = ("images", "iterations")
METRICS = study_metrics()          # every registered quantity at each sampler (ayt/eval/metrics.py)
TRIAL_BACKENDS = ("auto", "in_process", "ray_train")
PROTOCOLS = ("single", "tune_then_repeat", "search_then_confirm")
TARGET_SCOPES = ("shared", "per_series")
ENDPOINT_NAMES = tuple(ENDPOINTS)


def spec(default: Any = dataclasses.MISSING, *, doc: str, choices: tuple | None = None, minimum: float | None = None,
         above: float | None = None, nonempty: bool = False, defines: bool = True, factory: Any = None,
         internal: bool = False, new: bool = False, legacy: Any = dataclasses.MISSING,
         only_with: tuple[str, Any] | None = None, id_unused: Any = dataclasses.MISSING) -> Any:
    """A schema field: its default and what the type cannot say (see the module docstring).
    `minimum` is inclusive, `above` exclusive; `internal` fields are set by a protocol, not a
    user, and stay out of the study id while unset; `new` fields (added after studies were
    run) stay out of it while at their default, so every earlier study keeps its id. A new
    field whose default for new studies differs from what earlier studies computed names that
    value as `legacy`: it stays out of the id while at it (an earlier study's yaml pins it). A
    field that means something only while another has one value, `only_with=(path, value)`,
    stays out of the id otherwise, or, where earlier studies hashed it, counts there as
    `id_unused` whatever it is set to (its default may then change)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "above": above, "nonempty": nonempty,
            "defines": defines, "internal": internal, "new": new or legacy is not dataclasses.MISSING}
    if legacy is not dataclasses.MISSING:
        meta["legacy"] = legacy
    if only_with is not None:
        meta["only_with"] = only_with
    if id_unused is not dataclasses.MISSING:
        meta["id_unused"] = id_unused
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Budget:
    unit: str = spec("images", doc="what amount counts, per trial", choices=BUDGET_UNITS)
    amount: int = spec(9600, doc="images (a multiple of every batch size x evals) or iterations per trial",
                       minimum=1)
    evals: int = spec(4, doc="FID evaluations, evenly spaced over the budget", minimum=1)


@dataclass
class Target:
    fid: Optional[float] = spec(None, doc="a fixed target FID for 'iterations to target'")
    reference: Optional[Dict[str, Any]] = spec(None, doc="or the group whose final FID is the target, "
                                                         "e.g. {loss: pseudo_huber}")


@dataclass
class Asha:
    grace_evals: int = spec(1, doc="evaluations every trial runs before ASHA may stop it (<= budget.evals)",
                            minimum=1)
    reduction_factor: float = spec(2.0, doc="ASHA keeps 1/reduction_factor of the trials at each rung", above=1)


@dataclass
class TuneStage:
    key: str = spec("lr", doc="the config key tuned per group", nonempty=True)
    low: float = spec(3e-4, doc="lower end of the tuned range")
    high: float = spec(1e-2, doc="upper end of the tuned range")
    log: bool = spec(True, doc="log-spaced values")
    search: str = spec("grid", doc="grid (`points` values) or an Optuna sampler (`trials` samples)",
                       choices=SEARCHES)
    points: int = spec(4, doc="values of a grid tuning stage", minimum=1)
    trials: int = spec(6, doc="samples of a tpe/random tuning stage", minimum=1)
    # tune_then_repeat refuses fewer than 2 (`allow_one_seed`). A study of another protocol
    # hashes this key as its old default, [1000]: committed studies keep their ids.
    seeds: List[int] = spec(doc="tuning seeds, apart from study.seeds (no selection bias in stage 2); "
                                "tune_then_repeat needs >= 2 to tell its candidates apart",
                            factory=lambda: [1000, 1001], minimum=0, nonempty=True,
                            only_with=("protocol.name", "tune_then_repeat"), id_unused=[1000])
    allow_one_seed: bool = spec(False, doc="tune on a single seed anyway (the winner cannot be told apart from "
                                           "the runner-up)", new=True)
    max_extensions: int = spec(2, doc="grid rounds that extend the range one step past an edge winner, until it "
                                      "is interior (0: only flag it)", minimum=0, new=True)
    floor: Optional[float] = spec(None, doc="no extension tries a value below this (null: none)", new=True)
    ceiling: Optional[float] = spec(None, doc="no extension tries a value above this (null: none)", new=True)

    # What the protocol computes from these fields (ayt/studies/protocols/tune_then_repeat.py runs on this class).
    def grid_values(self) -> list[float]:
        """`points` values from low to high (geometric if log), at 3 significant digits."""
        if self.points == 1:
            return [_round3(self.low)]
        return [self.step(i) for i in range(self.points)]

    def step(self, i: int) -> float:
        """The grid's i-th value, counted from `low` (negative, or past points - 1: beyond the
        range by the grid's own ratio or step), at 3 significant digits."""
        if self.log:
            return _round3(self.low * ((self.high / self.low) ** (1 / (self.points - 1))) ** i)
        step = (self.high - self.low) / (self.points - 1)
        value = self.low + step * i
        return 0.0 if abs(value) < abs(step) * 1e-9 else _round3(value)    # 0.2 - 0.2 is 2.8e-17 in floats

    @property
    def extends(self) -> bool:
        """Whether an edge winner extends the range: a grid of >= 2 points (a step to repeat)."""
        return self.search == "grid" and self.points >= 2 and self.max_extensions > 0

    def axis(self) -> Any:
        """The tuned key's axis in a stage-1 study: the grid's values, or the range a sampler draws from."""
        if self.search == "grid":
            return self.grid_values()
        return {"low": self.low, "high": self.high, "log": self.log}


def _round3(value: float) -> float:
    return float(f"{value:.3g}")


@dataclass
class ConfirmStage:
    k: int = spec(3, doc="configurations of the search re-run (its best k that ran the whole budget)", minimum=1,
                  new=True)
    seeds: List[int] = spec(doc="confirmation seeds, apart from study.seeds (the winner was chosen on those)",
                            factory=lambda: [100, 101, 102, 103, 104], minimum=0, nonempty=True, new=True)
    baseline: Dict[str, Any] = spec(doc="what the best are compared with: searched key -> value ({}: the "
                                        "config's defaults for every searched key)", factory=dict, new=True)
    # New searches run it; the committed ones (which did not) pin false and keep their ids.
    baseline_on_search_seeds: bool = spec(True, doc="the baseline runs on the search's own seeds too, so the report "
                                                    "splits the search-to-confirmation gap into the winner's own drop "
                                                    "and the seed effect", legacy=False,
                                          only_with=("protocol.name", "search_then_confirm"))


@dataclass
class Protocol:
    name: str = spec("single", doc="single: every group at the same settings; tune_then_repeat: stage 1 tunes "
                                   "`tune.key` per group, stage 2 repeats each at its best; search_then_confirm: "
                                   "the search, then its best `confirm.k` and the baseline on fresh seeds",
                     choices=PROTOCOLS)
    tune: TuneStage = spec(doc="stage 1 of tune_then_repeat", factory=TuneStage)
    confirm: ConfirmStage = spec(doc="stage 2 of search_then_confirm (ayt/studies/protocols/search_then_confirm.py)", factory=ConfirmStage)
    stage: Optional[str] = spec(None, doc="set by the protocol on the studies it derives", internal=True)
    group: Optional[str] = spec(None, doc="the group a derived stage-1 study tunes", internal=True)


@dataclass
class CriticalBatch:
    target: str = spec("shared", doc="one target FID for every series, or each series' own "
                                     "(ayt/studies/report/critical_batch.py says when)", choices=TARGET_SCOPES)


@dataclass
class SeedRounds:
    first: Optional[int] = spec(None, doc="seeds until decisive: the first round runs this many of study.seeds, "
                                          "then `step` more per round while a named comparison is inconclusive, "
                                          "up to every seed listed (null: all seeds at once)", minimum=2, new=True)
    step: int = spec(2, doc="seeds added per round", minimum=1, new=True)
    compare: List[str] = spec(doc="groups (e.g. loss=mfd) whose paired comparison with their reference "
                                  "(study.target.reference) must be decisive ([]: every group with a reference)",
                              factory=list, new=True)


@dataclass
class StudySchema:
    """The `study` block (conf/study/<name>.yaml sets only what makes that study)."""

    name: Optional[str] = spec(None, doc="MLflow experiment and report directory (no spaces or slashes)")
    preset: Optional[str] = spec("quick", doc="experiment preset every trial starts from (conf/experiment/)")
    fixed: List[str] = spec(doc="overrides applied to every trial, e.g. [batch_size=16]", factory=list)
    search: str = spec("grid", doc="how trials are chosen (Optuna sampler through Ray Tune's OptunaSearch)",
                       choices=SEARCHES)
    axes: Dict[str, Any] = spec(doc="config key or group -> list of values (grid) or {low, high, log, int}",
                                factory=dict)
    seeds: List[int] = spec(doc="repeat axis: every grid point runs once per seed", factory=lambda: [0], minimum=0,
                            nonempty=True)
    num_samples: Optional[int] = spec(None, doc="trials of a tpe/random search", minimum=1)
    sampler_seed: int = spec(0, doc="the Optuna sampler's seed")
    startup_trials: Optional[int] = spec(None, doc="random start-up trials of a tpe/gp search before its model "
                                                   "proposes (null: Optuna's 10; grid and random ignore it)",
                                         minimum=1, new=True)
    budget: Budget = spec(doc="training per trial", factory=Budget)
    metric: str = spec("fid_1step", doc="what Optuna and ASHA optimise, in its direction (ayt/eval/metrics.py; listed "
                                        "in eval.metrics), each trial's curve scored at study.endpoint", choices=METRICS)
    # New studies default to last_k (docs/statistics.md says why); every study run before the field
    # existed scored its trials at `final`, which stays out of the id (their yamls pin it).
    endpoint: str = spec("last_k", doc="how a trial's curve becomes its one score, everywhere the study ranks or "
                                       "compares (verdicts, seed rounds, tuning, confirmation, Tune's metric): the last "
                                       "evaluation, the mean of the last endpoint_k, or the mean over the curve on "
                                       "images seen (ayt/studies/protocols/endpoint.py)", choices=ENDPOINT_NAMES, legacy="final")
    endpoint_k: Optional[int] = spec(None, doc="evaluations last_k averages, <= study.budget.evals (null: 3, or "
                                               "every evaluation of a budget with fewer)", minimum=1,
                                     only_with=("endpoint", "last_k"), new=True)
    pilot: Optional[str] = spec(None, doc="a finished study's report directory (its curves.csv, trials.csv) whose "
                                          "seeds' spread at this endpoint plans the seeds (--plan)", defines=False)
    detect: Optional[str] = spec(None, doc="the difference the comparisons should detect at 80% power, for --plan: a "
                                           "number (e.g. 5) or a percentage of the reference's score (e.g. 10%)",
                                 defines=False)
    target: Target = spec(doc="'iterations to reach a target FID' in the report", factory=Target)
    scheduler: str = spec("none", doc="early stopping on the FID curve (time = images seen)", choices=SCHEDULERS)
    asha: Asha = spec(doc="the ASHA scheduler's settings", factory=Asha)
    max_concurrent_trials: Optional[int] = spec(None, doc="null: as many as the cluster's CPUs/GPUs hold",
                                                minimum=1, defines=False)
    max_failures: int = spec(1, doc="Tune retries of a failed trial (it resumes from its checkpoint)", minimum=0,
                             defines=False)
    trial_backend: str = spec("auto", doc="one-worker trials train in the Tune trial's own process (auto); more "
                                          "workers always use Ray Train", choices=TRIAL_BACKENDS, defines=False)
    resume: bool = spec(False, doc="finish the study of the same config under the same out_dir", defines=False)
    allow_code_change: bool = spec(False, doc="resume even if the code changed since the study started (refused "
                                              "otherwise); each trial's run records its code", defines=False)
    protocol: Protocol = spec(doc="how the groups are compared (ayt/studies/protocols/tune_then_repeat.py)", factory=Protocol)
    tuned: Dict[str, Any] = spec(doc="group label -> {key: value}: set by tune_then_repeat for stage 2, or by hand "
                                     "over some axes (loss=mfd: {lr: 2.5e-4} applies at every batch size)",
                                 factory=dict)
    tuned_source: Optional[str] = spec(None, doc="where hand-set `tuned` values came from (the report says it)",
                                       defines=False)
    candidates: Optional[Dict[str, Any]] = spec(None, doc="name -> {key: value}: the configurations a "
                                                          "`candidate` axis runs (set by search_then_confirm)",
                                                internal=True)
    critical_batch: CriticalBatch = spec(doc="the report's critical-batch-size section", factory=CriticalBatch,
                                         defines=False)
    seed_rounds: SeedRounds = spec(doc="seeds added in rounds until the comparisons are decisive "
                                       "(ayt/studies/protocols/seed_rounds.py)", factory=SeedRounds)


ConfigStore.instance().store(group="study", name="schema", node=StudySchema)


# ---- what is derived from the declarations --------------------------------------------------

@dataclass(frozen=True)
class FieldInfo:
    path: str                    # dotted, under `study.`
    type: Any
    default: Any
    meta: Mapping[str, Any]


def fields(schema: type = StudySchema, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf field of the schema, depth first in declaration order."""
    for f in dataclasses.fields(schema):
        path = prefix + f.name
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else _resolve(f.type)):
            yield from fields(_resolve(f.type), path + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        yield FieldInfo(path, f.type, default, f.metadata)


def _resolve(annotation: Any) -> Any:
    """Field types are strings under `from __future__ import annotations`."""
    return globals().get(annotation, annotation) if isinstance(annotation, str) else annotation


def open_blocks() -> tuple[str, ...]:
    """The study blocks that take keys the schema does not name (`Dict` fields: study.axes,
    study.tuned, ...): a new key there is added with Hydra's `+`."""
    return tuple("study." + f.path for f in fields() if "Dict[" in str(f.type))


def volatile_keys() -> tuple[str, ...]:
    """Top-level study keys that change how a study runs or is reported, not what it computes."""
    return tuple(f.name for f in dataclasses.fields(StudySchema) if not f.metadata.get("defines", True))


def identity(study: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved study block that defines the study (its id hashes this); a copy,
    `study` is left as it is."""
    out = copy.deepcopy({k: v for k, v in study.items() if k not in volatile_keys()})
    for info in fields():
        parent, _, leaf = info.path.rpartition(".")
        node = _get(out, parent) if parent else out
        condition = info.meta.get("only_with")
        meaningless = condition is not None and str(_get(study, condition[0])) != condition[1]
        if "id_unused" in info.meta:
            if meaningless and isinstance(node, dict) and leaf in node:
                node[leaf] = copy.deepcopy(info.meta["id_unused"])
            continue
        unset = None if info.meta.get("internal") else info.meta.get("legacy", info.default) \
            if info.meta.get("new") else ...
        if unset is ...:
            continue
        if isinstance(node, dict) and leaf in node and (node[leaf] == unset or meaningless):
            node.pop(leaf)
            if parent and not node:                 # a block of only new fields at their defaults
                grand, _, name = parent.rpartition(".")
                (_get(out, grand) if grand else out).pop(name, None)
    return out


def usage() -> str:
    """One line per study key: its default and what it is for."""
    lines = []
    for info in fields():
        extra = f" ({' | '.join(info.meta['choices'])})" if info.meta.get("choices") else ""
        if info.meta.get("internal"):
            continue
        lines.append(f"  study.{info.path}{extra} = {_show(info.default)}: {info.meta.get('doc', '')}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def validate(study: Mapping[str, Any]) -> None:
    """Each field's own checks (choices, bounds, non-empty) and no undeclared key (`+study.x=1`
    gets past Hydra's struct mode); one line naming the first bad field."""
    _no_unknown_keys(study, StudySchema, "study.")
    for info in fields():
        value = _get(study, info.path)
        where = f"study.{info.path}"
        meta = info.meta
        if value is None:
            continue
        if meta.get("choices") and str(value) not in meta["choices"]:
            raise ConfigError(where, f"unknown value {value!r}; allowed: " + ", ".join(meta["choices"]))
        if meta.get("nonempty") and (value == "" or (isinstance(value, (list, tuple)) and not value)):
            raise ConfigError(where, f"must be non-empty, got {value!r}")
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if meta.get("minimum") is not None and isinstance(item, (int, float)) and item < meta["minimum"]:
                what = "integers" if isinstance(item, int) else "numbers"
                raise ConfigError(where, (f"must be {what} >= {meta['minimum']:g}" if isinstance(value, (list, tuple))
                                          else f"must be >= {meta['minimum']:g}") + f", got {value!r}")
            if meta.get("above") is not None and isinstance(item, (int, float)) and item <= meta["above"]:
                raise ConfigError(where, f"must be a number > {meta['above']:g}, got {value!r}")


def _no_unknown_keys(node: Mapping[str, Any], schema: type, prefix: str) -> None:
    declared = {f.name: _resolve(f.type) for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in declared:
            raise ConfigError(prefix + str(key), "not a study key; allowed: " + ", ".join(declared)
                              + " (ayt/studies/engine/schema.py)")
        if dataclasses.is_dataclass(declared[key]) and isinstance(value, Mapping):
            _no_unknown_keys(value, declared[key], f"{prefix}{key}.")


def _get(node: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
