"""A study's search space: axes over config keys or config groups, seeds as a repeat axis,
and a budget in images seen (or iterations) that becomes each trial's training schedule.

An axis is a list of values (categorical; the only kind a grid allows) or a range
``{low, high, log, int}`` that Optuna samples. Axis names are dotted config keys
(``batch_size``, ``loss.huber_c``, ``augment.geo.p``) or config groups (``loss``, ``augment``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from ayt.errors import ConfigError

CONFIG_GROUPS = ("dataset", "network", "schedule", "loss", "augment", "scaling", "feature_map")
from ayt.studies.engine.schema import BUDGET_UNITS, SCHEDULERS, SEARCHES  # noqa: F401  (declared once, in the schema)
LABEL_PREFIXES = {"batch_size": "b", "seed": "s"}      # the axes a trial label abbreviates most
# The axis whose values are named configurations (`study.candidates`: name -> {key: value}):
# how search_then_confirm runs its best found and a baseline side by side (ayt/studies/protocols/search_then_confirm.py).
CANDIDATE_AXIS = "candidate"
# The keys a study sets on every trial from its budget (`StudySpace.schedule_overrides`).
SCHEDULE_KEYS = ("training.iterations", "training.eval_every", "training.checkpoint_every", "training.log_every")
# Every key the study itself sets per trial, with what sets it: a value for one of them given
# anywhere else (an axis, study.fixed, study.tuned, a command-line override) would be
# overruled, so planning refuses it (`check_not_derived`).
DERIVED_KEYS = {**{key: ("study.budget", "set study.budget.amount / evals instead, or run one study per value")
                   for key in SCHEDULE_KEYS},
                "seed": ("study.seeds", "list the seeds there, e.g. study.seeds=[0,1,2]"),
                "name": ("the study id and the trial", "leave it out (study.name names the study)")}


@dataclass(frozen=True)
class Axis:
    """One swept dimension of a study."""

    key: str                                   # dotted config key or config group
    values: tuple | None = None                # categorical values
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    settings: tuple = ()                       # a candidate axis: (value, ((key, setting), ...)) per value

    @property
    def param(self) -> str:
        """The name Optuna and Tune see (no dots: Tune would nest dotted keys)."""
        return self.key.replace(".", "__")

    @property
    def is_group(self) -> bool:
        return self.key in CONFIG_GROUPS

    def suggest(self, trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.param, list(self.values))
        if self.integer:
            return trial.suggest_int(self.param, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.param, float(self.low), float(self.high), log=self.log)

    def corners(self) -> list:
        """Values that stand for the whole axis when validating it up front."""
        return list(self.values) if self.values is not None else [self.low, self.high]

    def override(self, value: Any) -> str:
        return f"{self.key}={_hydra_value(value)}"

    def overrides(self, value: Any) -> list[str]:
        """The Hydra overrides of one value: `key=value`, or a candidate's settings."""
        if self.key != CANDIDATE_AXIS:
            return [self.override(value)]
        settings = dict(self.settings)[value]
        return [f"{key}={_hydra_value(setting)}" for key, setting in settings]

    def label(self, value: Any) -> str:
        """This axis' part of a trial label: `b16`, `s0`, a group's option (`mfd`), else
        `<last key part>=<value>` with floats at 3 significant digits (`huber_c=0.0473`)."""
        text = f"{value:.3g}" if isinstance(value, float) else _hydra_value(value)
        if self.key in LABEL_PREFIXES:
            return LABEL_PREFIXES[self.key] + text
        if self.is_group or self.key == CANDIDATE_AXIS:
            return text
        return f"{self.key.rsplit('.', 1)[-1]}={text}"


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def log_every(eval_every: int, at_most: int = 25) -> int:
    """The loss cadence of a trial: the largest divisor of `eval_every` that is at most
    `at_most` and gives at least two loss points per evaluation (1 if none)."""
    return max((d for d in range(1, min(at_most, eval_every // 2) + 1) if eval_every % d == 0), default=1)


@dataclass
class StudySpace:
    """Axes, seeds and budget of one study, checked on construction."""

    name: str
    search: str
    axes: list[Axis]
    seeds: list[int]
    num_samples: int | None
    budget_unit: str
    budget_amount: int
    evals: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed_axis(self) -> Axis | None:
        if self.search == "grid" or len(self.seeds) > 1:
            return Axis("seed", values=tuple(self.seeds))
        return None

    @property
    def all_axes(self) -> list[Axis]:
        return self.axes + ([self.seed_axis] if self.seed_axis else [])

    def grid(self) -> list[dict[str, Any]]:
        """Every point of a grid study (axis param name -> value), seeds innermost."""
        axes = self.all_axes
        return [dict(zip([a.param for a in axes], point)) for point in itertools.product(*(a.values for a in axes))]

    def trial_count(self) -> int:
        return len(self.grid()) if self.search == "grid" else int(self.num_samples)

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run space (OptunaSearch calls it with an Optuna trial)."""
        for axis in self.all_axes:
            axis.suggest(trial)

    def label(self, params: dict[str, Any], trial_id: str | None = None) -> str:
        """A trial's short, readable name from its axis values, in axis order (seed last):
        `b16-mfd-s0-57f9`. The same label names its console lines, report rows and MLflow
        run; the study id and the full Tune trial id stay in the run's tags."""
        parts = [axis.label(params[axis.param]) for axis in self.all_axes if axis.param in params]
        if self.seed_axis is None:
            parts.append(f"s{self.seeds[0]}")
        if trial_id:
            parts.append(trial_id.replace("_", "")[:4])
        return "-".join(parts)

    def grid_space(self) -> dict[str, list]:
        return {a.param: list(a.values) for a in self.all_axes}

    def overrides(self, params: dict[str, Any], batch_size: int) -> list[str]:
        """Hydra overrides of one trial: its axis values, its seed and the budget schedule."""
        by_param = {a.param: a for a in self.all_axes}
        out = [o for p, v in params.items() if p in by_param for o in by_param[p].overrides(v)]
        if self.seed_axis is None:
            out.append(f"seed={self.seeds[0]}")
        out += self.schedule_overrides(batch_size)
        return out

    def schedule_overrides(self, batch_size: int) -> list[str]:
        iterations, eval_every = self.schedule(batch_size)
        values = (iterations, eval_every, eval_every, log_every(eval_every))
        return [f"{key}={value}" for key, value in zip(SCHEDULE_KEYS, values)]

    def schedule(self, batch_size: int) -> tuple[int, int]:
        """(iterations, eval_every) for a trial at this batch size."""
        if self.budget_unit == "iterations":
            iterations = self.budget_amount
        else:
            if self.budget_amount % batch_size:
                raise ConfigError("study.budget.amount", f"{self.budget_amount} images is not a multiple of "
                                  f"batch_size={batch_size}; choose a multiple of every swept batch size")
            iterations = self.budget_amount // batch_size
        if iterations % self.evals:
            raise ConfigError("study.budget.evals", f"{iterations} iterations (batch {batch_size}) do not split into "
                              f"{self.evals} equal evaluation intervals")
        return iterations, iterations // self.evals

    def max_images(self, batch_sizes: Iterable[int]) -> int:
        if self.budget_unit == "images":
            return self.budget_amount
        return self.budget_amount * max(batch_sizes)


def parse_space(study: DictConfig) -> StudySpace:
    """The study block of the config as a StudySpace; one clear line per problem."""
    name = str(study.get("name") or "")
    if not name or any(c in name for c in "/\\ "):
        raise ConfigError("study.name", f"must be a non-empty name without spaces or slashes, got {name!r}")
    search = str(study.search)            # each field's type and own check: the schema (already applied)
    if not isinstance(study.axes, DictConfig) or len(study.axes) == 0:
        raise ConfigError("study.axes", "a study needs at least one axis (config key or group -> values)")
    axes = [_parse_axis(k, v, search) for k, v in _axis_nodes(study.axes)]
    axes = [_candidate_axis(a, study.get("candidates")) if a.key == CANDIDATE_AXIS else a for a in axes]
    seeds = list(study.seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("study.seeds", f"repeats a seed: {seeds}")
    num_samples = study.get("num_samples")
    if search != "grid" and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError("study.num_samples", f"search={search} needs a number of trials >= 1, got {num_samples!r}")
    unit, amount, evals = str(study.budget.unit), study.budget.amount, study.budget.evals
    return StudySpace(name=name, search=search, axes=axes, seeds=seeds, num_samples=num_samples,
                      budget_unit=unit, budget_amount=int(amount), evals=int(evals))


def _axis_nodes(node: DictConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """Axes nest like the config: ``loss: {huber_c: {low: .., high: ..}}`` is the axis
    ``loss.huber_c``; a list or a ``{low, high}`` range ends the nesting. ``_option`` under a
    group sweeps the group's option next to its keys: ``augment: {_option: [geo, deg], p: ..}``."""
    out = []
    for key, value in node.items():
        name = prefix.rstrip(".") if key == "_option" and prefix else f"{prefix}{key}"
        if isinstance(value, DictConfig) and len(value) and not ({"low", "high"} & set(value.keys())):
            out += _axis_nodes(value, name + ".")
        else:
            out.append((name, value))
    return out


def _parse_axis(key: str, spec: Any, search: str) -> Axis:
    where = f"study.axes.{key}"
    check_not_derived(key, where)
    if isinstance(spec, ListConfig):
        values = tuple(OmegaConf.to_container(spec, resolve=True))
        if not values:
            raise ConfigError(where, "empty list of values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(where, f"repeats a value: {list(values)}")
        return Axis(key, values=values)
    if isinstance(spec, DictConfig):
        if search == "grid":
            raise ConfigError(where, "a grid needs a list of values, not a range; use search=tpe or random for ranges")
        unknown = set(spec.keys()) - {"low", "high", "log", "int"}
        if unknown:
            raise ConfigError(where, f"unknown range field(s) {sorted(unknown)}; allowed: low, high, log, int")
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(where, f"a range needs numbers low < high, got low={low!r}, high={high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(where, f"a log range needs low > 0, got {low}")
        return Axis(key, low=low, high=high, log=bool(spec.get("log", False)), integer=bool(spec.get("int", False)))
    raise ConfigError(where, f"must be a list of values or a range {{low, high, log}}, got {spec!r}")


def check_not_derived(key: str, where: str) -> None:
    """Refuse a value for a key the study sets on every trial itself (`DERIVED_KEYS`)."""
    if key in DERIVED_KEYS:
        source, instead = DERIVED_KEYS[key]
        raise ConfigError(where, f"the study sets {key} on every trial from {source}, which would overrule "
                          f"this value; {instead}")


def _candidate_axis(axis: Axis, candidates: Any) -> Axis:
    """`candidate: [baseline, best1]` with `study.candidates` naming each one's settings."""
    where = f"study.axes.{CANDIDATE_AXIS}"
    if axis.values is None:
        raise ConfigError(where, "a candidate axis lists names of study.candidates, not a range")
    candidates = OmegaConf.to_container(candidates, resolve=True) if isinstance(candidates, DictConfig) else candidates
    if not isinstance(candidates, dict):
        raise ConfigError("study.candidates", f"a candidate axis needs study.candidates (name -> {{key: value}}), "
                          f"got {candidates!r}")
    settings = []
    for name in axis.values:
        if name not in candidates or not isinstance(candidates[name], dict):
            raise ConfigError(where, f"{name!r} is not a candidate; study.candidates has: " + ", ".join(candidates))
        settings.append((name, tuple(candidates[name].items())))
    return Axis(axis.key, values=axis.values, settings=tuple(settings))


def check_axis_keys(space: StudySpace, base: DictConfig) -> None:
    """Every axis names a config group or a key that exists in the trial config (a candidate
    axis: every key its candidates set)."""
    for axis in space.axes:
        if axis.key == CANDIDATE_AXIS:
            for name, settings in axis.settings:
                for key, _ in settings:
                    _check_key(Axis(key), base, f"study.candidates.{name}.{key}")
            continue
        _check_key(axis, base, f"study.axes.{axis.key}")


def _check_key(axis: Axis, base: DictConfig, where: str) -> None:
    if axis.is_group:
        return
    parent, _, leaf = axis.key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig) or leaf not in node:
        raise ConfigError(where, "unknown axis: not a config key; allowed: a config group ("
                          + ", ".join(CONFIG_GROUPS) + ") or an existing dotted key such as batch_size, "
                          "loss.huber_c, augment.geo.p")


def integer_ranges(space: StudySpace, base: DictConfig, takes_fractions: Callable[[str, float], bool]) -> None:
    """A range over an integer key samples integers (`int: true` implied); one whose bounds are
    not integers is refused (a trial would get 23.4 where 23 was meant). An integer key is one
    whose value is an integer and that refuses a fraction: `takes_fractions(key, value)` asks
    the config's own checks."""
    for i, axis in enumerate(space.axes):
        if axis.values is not None or axis.integer or axis.is_group:
            continue
        value = OmegaConf.select(base, axis.key)
        if not isinstance(value, int) or isinstance(value, bool) or takes_fractions(axis.key, axis.low + 0.5):
            continue
        if not all(float(v).is_integer() for v in (axis.low, axis.high)):
            raise ConfigError(f"study.axes.{axis.key}", f"{axis.key} is an integer, but the range "
                              f"[{axis.low}, {axis.high}] is not; type integer bounds, e.g. "
                              f"{{low: {math.ceil(axis.low)}, high: {math.floor(axis.high)}, int: true}}")
        space.axes[i] = Axis(axis.key, low=int(axis.low), high=int(axis.high), log=axis.log, integer=True)
