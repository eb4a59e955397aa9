"""Comparison protocols: how a study's groups are put side by side.

`single` (default): every group runs at the same settings (the study's trials as listed).

`tune_then_repeat`: one shared learning rate compares a loss whose gradient points along
the pixel error with one whose gradient does not at different *effective* step sizes. So:

  stage 1 (tune)    for each group (a point of the study's axes, seeds excluded), search
                    `protocol.tune.key` (the lr by default, log scale) with Optuna on the
                    study's own budget, on tuning seeds kept apart from the repeat seeds
                    (choosing and measuring on the same seeds would flatter the winner);
  stage 2 (repeat)  run the study as written, each group at its own best value, over the
                    study's seeds; the report says which value each group ran at and why.

Each stage is an ordinary study on the shared runner (resumable, one MLflow parent run per
stage-1 group under the experiment `<name>-tune`, Tune + Optuna underneath); this module
holds only what the protocol decides, the runner runs it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig

from ayt.errors import ConfigError
from ayt.studies.group import Group
from ayt.studies.schema import PROTOCOLS  # noqa: F401  (declared once, in the schema)
from ayt.studies.space import StudySpace

TUNING_FILE = "tuning.json"          # stage-1 outcome, next to the stage-2 report


@dataclass(frozen=True)
class TuneStage:
    """Stage 1 of tune_then_repeat: what is searched, how, and on which seeds."""

    key: str                 # a config key, e.g. lr
    low: float
    high: float
    log: bool
    search: str              # grid (`points` values, log-spaced if log) | tpe | random (`trials` samples)
    points: int
    trials: int
    seeds: tuple[int, ...]

    def grid_values(self) -> list[float]:
        """`points` values from low to high (geometric if log), at 3 significant digits."""
        if self.points == 1:
            return [_round(self.low)]
        if self.log:
            ratio = (self.high / self.low) ** (1 / (self.points - 1))
            return [_round(self.low * ratio ** i) for i in range(self.points)]
        step = (self.high - self.low) / (self.points - 1)
        return [_round(self.low + step * i) for i in range(self.points)]

    def axis(self) -> Any:
        if self.search == "grid":
            return self.grid_values()
        return {"low": self.low, "high": self.high, "log": self.log}


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def protocol_name(study: Mapping[str, Any]) -> str:
    """`study.protocol.name` (its allowed values: the schema)."""
    return str(study["protocol"]["name"])


def parse_tune_stage(study: Mapping[str, Any], space: StudySpace) -> TuneStage:
    """`study.protocol.tune` with what relates it to the rest of the study checked (each field's
    type and own check is the schema's): one line naming the field on any problem."""
    tune = study["protocol"]["tune"]
    where = "study.protocol.tune"
    key, low, high, log = tune["key"], tune["low"], tune["high"], bool(tune["log"])
    if any(a.key == key for a in space.axes):
        raise ConfigError(f"{where}.key", f"{key} is also a study axis; a tuned key cannot be swept as well")
    if not low < high:
        raise ConfigError(f"{where}.low", f"a range needs numbers low < high, got low={low!r}, high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}.low", f"a log range needs low > 0, got {low}")
    search, points, trials, seeds = str(tune["search"]), tune["points"], tune["trials"], list(tune["seeds"])
    if set(seeds) & set(space.seeds):
        raise ConfigError(f"{where}.seeds", f"{sorted(set(seeds) & set(space.seeds))} are also repeat seeds "
                          f"(study.seeds={space.seeds}); tune on other seeds so the repeat measures the choice fairly")
    if space.search != "grid":
        raise ConfigError("study.search", "tune_then_repeat repeats every group of a grid; got search="
                          f"{space.search}")
    return TuneStage(key=key, low=float(low), high=float(high), log=log, search=search, points=int(points),
                     trials=int(trials), seeds=tuple(int(s) for s in seeds))


def groups(space: StudySpace) -> list[dict[str, Any]]:
    """The study's groups: every point of its axes without the seed (axis param -> value)."""
    seen, out = set(), []
    for point in space.grid():
        group = {k: v for k, v in point.items() if k != "seed"}
        key = space_group(space, group)
        if key not in seen:
            seen.add(key)
            out.append(group)
    return out


def space_group(space: StudySpace, params: Mapping[str, Any]) -> Group:
    """The group of Tune/Optuna params: each axis' config key and value, in axis order."""
    return Group.of((a.key, params[a.param]) for a in space.axes if a.param in params)


def group_key(space: StudySpace, params: Mapping[str, Any]) -> str:
    """`loss=mfd,batch_size=16`: a group's name, in axis order, from Tune/Optuna params."""
    return space_group(space, params).joined(",")


def stage_name(name: str, group: str) -> str:
    """Study name of a group's tuning stage (a report directory and an MLflow parent run)."""
    return f"{name}-tune-" + re.sub(r"[^A-Za-z0-9._-]+", "-", group).strip("-")


def tune_edit(space: StudySpace, stage: TuneStage, group: Mapping[str, Any]) -> Callable[[DictConfig], None]:
    """How stage 1 of one group differs from the study: the group's values fixed, the tuned key
    the only axis, the tuning seeds, no target (a single group has no reference)."""
    by_param = {a.param: a for a in space.axes}

    def edit(study: DictConfig) -> None:
        label = group_key(space, group)
        study.name = stage_name(space.name, label)
        study.fixed = [*(study.fixed or []), *(by_param[p].override(v) for p, v in group.items())]
        study.axes = {stage.key: stage.axis()}
        study.seeds = list(stage.seeds)
        study.search = stage.search
        study.num_samples = stage.trials if stage.search != "grid" else None
        study.target.fid, study.target.reference = None, None
        # Field by field: the study block is typed (ayt/studies/schema.py); its tune settings stay.
        study.protocol.name, study.protocol.stage, study.protocol.group = "single", "tune", label
    return edit


def repeat_edit(tuned: Mapping[str, Mapping[str, float]]) -> Callable[[DictConfig], None]:
    """Stage 2: the study as written, each group at its tuned values (part of its identity)."""
    def edit(study: DictConfig) -> None:
        study.tuned = {group: dict(values) for group, values in tuned.items()}
    return edit


def parse_group_label(space: StudySpace, label: str) -> dict[str, str]:
    """`loss=mfd,batch_size=16` -> {"loss": "mfd", "batch_size": "16"}, every key an axis of the
    study and every value one of its values (a ConfigError naming `study.tuned` otherwise)."""
    axes = {a.key: a for a in space.axes}
    pairs: dict[str, str] = {}
    for part in str(label).split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in axes:
            raise ConfigError("study.tuned", f"group {label!r}: {part!r} is not <axis>=<value> with an axis of "
                              "this study (" + ", ".join(axes) + ")")
        allowed = [str(v) for v in (axes[key].values or ())]
        if allowed and value not in allowed:
            raise ConfigError("study.tuned", f"group {label!r}: {key}={value} is not a value of that axis; "
                              "allowed: " + ", ".join(allowed))
        pairs[key] = value
    return pairs


def check_tuned(study: Mapping[str, Any], space: StudySpace) -> None:
    """`study.tuned`, checked before anything runs: group labels over the study's axes, each
    mapping config keys to values; no trial matched by two labels that set the same key."""
    tuned = study.get("tuned") or {}
    if not isinstance(tuned, Mapping):
        raise ConfigError("study.tuned", f"must map a group (e.g. loss=mfd) to {{key: value}}, got {tuned!r}")
    for label, values in tuned.items():
        parse_group_label(space, label)
        if not isinstance(values, Mapping) or not values:
            raise ConfigError("study.tuned", f"group {label!r} must map config keys to values, e.g. {{lr: 1e-3}}, "
                              f"got {values!r}")
    for point in space.grid() if space.search == "grid" else []:
        set_by: dict[str, str] = {}
        for label in _matching(tuned, space, point):
            for key in tuned[label]:
                if key in set_by:
                    raise ConfigError("study.tuned", f"groups {set_by[key]!r} and {label!r} both set {key} "
                                      "for the same trials; give each trial one value")
                set_by[key] = label


def _matching(tuned: Mapping[str, Any], space: StudySpace, params: Mapping[str, Any]) -> list[str]:
    """The tuned labels a trial belongs to: every axis value the label names equals the trial's."""
    mine = space_group(space, params)
    return [label for label in tuned if mine.matches(parse_group_label(space, label))]


def tuned_overrides(study: Mapping[str, Any], space: StudySpace, params: Mapping[str, Any]) -> list[str]:
    """A trial's overrides from `study.tuned`: stage 2 of tune-then-repeat sets one label per
    group; a study may also set it by hand with labels over some of its axes (e.g. each loss's
    lr from an earlier tuning applied at every batch size: `loss=mfd: {lr: 2.5e-4}`)."""
    tuned = study.get("tuned") or {}
    out: list[str] = []
    for label in _matching(tuned, space, params):
        out += [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
                for key, value in tuned[label].items()]
    return out


def choose(values: Mapping[float, Sequence[float]]) -> tuple[float | None, dict[float, float]]:
    """The value with the lowest mean metric over the tuning seeds (failed trials left out:
    a value whose every trial failed cannot win). Returns (best or None, mean per value)."""
    means = {}
    for value, metrics in values.items():
        finite = [m for m in metrics if m is not None and math.isfinite(m)]
        means[value] = sum(finite) / len(finite) if finite else math.nan
    ok = {v: m for v, m in means.items() if math.isfinite(m)}
    return (min(ok, key=ok.get) if ok else None), means


def write_tuning(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def report_lines(study: Mapping[str, Any], out_dir: Path) -> list[str]:
    """The report's protocol section: what each group ran at, and the tuning it came from."""
    if not study.get("tuned"):
        return []
    path = out_dir / TUNING_FILE
    if not path.is_file():
        return _given_lines(study)
    record = json.loads(path.read_text())
    key = record.get("key", "the tuned key")
    lines = ["## Protocol: tune, then repeat", "",
             f"Each group runs at its own best `{key}`, chosen in stage 1 by the lowest mean final "
             f"{record.get('metric', 'FID')} on tuning seeds {record.get('seeds', '?')} (not the seeds above), "
             f"{record.get('search', '?')} search over [{record.get('low', '?')}, {record.get('high', '?')}]"
             f"{' (log scale)' if record.get('log') else ''}, on this study's budget. The groups are therefore "
             "compared at their own best settings, not at one shared value.", "",
             f"| group | chosen {key} | stage-1 mean final FID per {key} (tried) | stage-1 report |", "|---|---|---|---|"]
    edges: list[str] = []
    for group, values in study["tuned"].items():
        info = record.get("groups", {}).get(group, {})
        tried = ", ".join(f"{v}: {m:.1f}" if math.isfinite(m) else f"{v}: failed"
                          for v, m in sorted((float(v), m) for v, m in info.get("means", {}).items()))
        tried_values = sorted(float(v) for v in info.get("means", {}))
        chosen = values.get(key, "?")
        edge = len(tried_values) > 1 and chosen in (tried_values[0], tried_values[-1])
        edges += [group] if edge else []
        lines.append(f"| {group} | {chosen}{' (edge)' if edge else ''} | {tried or '?'} | {info.get('report', '?')} |")
    if edges:
        lines += ["", f"At the edge of the searched range for {', '.join(edges)}: the best value may lie outside "
                  f"[{record.get('low')}, {record.get('high')}]; widen `study.protocol.tune` to find out."]
    return lines + [""]


def _given_lines(study: Mapping[str, Any]) -> list[str]:
    """The protocol section of a study whose `tuned` values were set in its config (no stage 1
    of its own): which trials ran at which values, and where the values came from."""
    lines = ["## Per-group settings (`study.tuned`)", "",
             "Set in the study config, not tuned by this study"
             + (f": {study['tuned_source']}" if study.get("tuned_source") else "")
             + ". Every trial of a group runs at its values (on top of any `lr_scaling`).", "",
             "| group | values |", "|---|---|"]
    for label, values in study["tuned"].items():
        lines.append(f"| {label} | " + ", ".join(f"{k}={v}" for k, v in values.items()) + " |")
    return lines + [""]
