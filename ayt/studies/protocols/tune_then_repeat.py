"""Comparison protocols: how a study's groups are put side by side.

`single` (default): every group runs at the same settings (the study's trials as listed).

`tune_then_repeat`: one shared learning rate compares a loss whose gradient points along
the pixel error with one whose gradient does not at different *effective* step sizes. So:

  stage 1 (tune)    for each group (a point of the study's axes, seeds excluded), search
                    `protocol.tune.key` (the lr by default, log scale) with Optuna on the
                    study's own budget, on tuning seeds kept apart from the repeat seeds
                    (choosing and measuring on the same seeds would flatter the winner), at
                    least two of them (one seed's noise is as large as the candidates'
                    differences: speed_tuned's 122 / 125 / 132); a grid winner at an edge of
                    the range gets one more round one grid step beyond that edge
                    (`<stage>-ext<k>`), until it is interior or `max_extensions` is reached,
                    since the optimum may lie outside the range;
  stage 2 (repeat)  run the study as written, each group at its own best value, over the
                    study's seeds; the report says which value each group ran at and why.

Each stage is an ordinary study on the shared runner (resumable, one MLflow parent run per
stage-1 group and extension round under the experiment `<name>-tune`, Tune + Optuna
underneath). An extension round's config follows only from the finished rounds before it, so
a resume replays the same rounds (each restored, none rerun). This module holds only what the
protocol decides, the runner runs it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig

from ayt.eval.metrics import MIN, direction, ranked
from ayt.errors import ConfigError
from ayt.studies.engine.group import Group
from ayt.studies.engine.schema import PROTOCOLS  # noqa: F401  (declared once, in the schema)
from ayt.studies.engine.schema import TuneStage  # the stage's fields, defaults and grid: declared once
from ayt.studies.engine.space import StudySpace
from ayt.studies.report.stats import paired

TUNING_FILE = "tuning.json"          # stage-1 outcome, next to the stage-2 report


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
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"{where}.seeds", f"{seeds} repeats a seed; each tuning seed is one pair of the "
                          "winner-vs-runner-up comparison")
    floor, ceiling = tune.get("floor"), tune.get("ceiling")
    if floor is not None and (floor > low or (log and floor <= 0)):
        raise ConfigError(f"{where}.floor", f"must be <= low ({low})" + (" and > 0 (a log range)" if log else "")
                          + f", got {floor}")
    if ceiling is not None and ceiling < high:
        raise ConfigError(f"{where}.ceiling", f"must be >= high ({high}), got {ceiling}")
    if set(seeds) & set(space.seeds):
        raise ConfigError(f"{where}.seeds", f"{sorted(set(seeds) & set(space.seeds))} are also repeat seeds "
                          f"(study.seeds={space.seeds}); tune on other seeds so the repeat measures the choice fairly")
    if space.search != "grid":
        raise ConfigError("study.search", "tune_then_repeat repeats every group of a grid; got search="
                          f"{space.search}")
    if len(seeds) < 2 and not tune.get("allow_one_seed", TuneStage.allow_one_seed):
        raise ConfigError(f"{where}.seeds", f"tune_then_repeat needs >= 2 tuning seeds to tell its candidates "
                          f"apart, got {seeds}; e.g. [1000, 1001], or {where}.allow_one_seed=true")
    # A field the block leaves out takes the schema's default (the one declaration).
    return TuneStage(**{**dict(tune), "low": float(low), "high": float(high), "log": log, "search": search,
                        "points": int(points), "trials": int(trials), "seeds": [int(s) for s in seeds],
                        "floor": None if floor is None else float(floor),
                        "ceiling": None if ceiling is None else float(ceiling)})


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
        # Field by field: the study block is typed (ayt/studies/engine/schema.py); its tune settings stay.
        study.protocol.name, study.protocol.stage, study.protocol.group = "single", "tune", label
    return edit


def extension_edit(space: StudySpace, stage: TuneStage, group: Mapping[str, Any], value: float,
                   round_: int) -> Callable[[DictConfig], None]:
    """Extension round `round_` of one group's tuning: its stage-1 study at the one new value
    (a study of its own, `<stage>-ext<k>`: the finished rounds stay as they are)."""
    tune = tune_edit(space, stage, group)

    def edit(study: DictConfig) -> None:
        tune(study)
        study.name = f"{study.name}-ext{round_}"
        study.axes = {stage.key: [value]}
    return edit


def edge_side(tried: Sequence[float], best: float) -> str | None:
    """"low" / "high" when `best` is the lowest / highest value tried (failed values count: a
    value beyond the winner that diverged bounds it too); None when interior or alone."""
    values = sorted(set(float(v) for v in tried))
    if len(values) < 2:
        return None
    return "low" if best == values[0] else "high" if best == values[-1] else None


def next_extension(stage: TuneStage, best: float, tried: Sequence[float]) -> tuple[float | None, str]:
    """The value the group's next round tries, one grid step beyond the edge its winner is at
    (value, "") — or (None, why there is none): interior | grid only | cap | floor | ceiling."""
    side = edge_side(tried, best)
    if side is None:
        return None, "interior"
    if not stage.extends:
        return None, "cap" if stage.search == "grid" and stage.points >= 2 else "grid only"
    beyond = [v for v in tried if (v < stage.low if side == "low" else v > stage.high)]
    if len(beyond) >= stage.max_extensions:
        return None, "cap"
    k = len(beyond) + 1
    value = stage.step(-k if side == "low" else stage.points - 1 + k)
    if side == "low" and stage.floor is not None and value < stage.floor:
        return None, "floor"
    if side == "high" and stage.ceiling is not None and value > stage.ceiling:
        return None, "ceiling"
    if value in tried or (stage.log and value <= 0):
        return None, "resolution"
    return value, ""


def extension_values(stage: TuneStage) -> list[float]:
    """Every value an extension may try (both sides, up to the cap and the floor/ceiling)."""
    if not stage.extends:
        return []
    low = [stage.step(-k) for k in range(1, stage.max_extensions + 1)]
    high = [stage.step(stage.points - 1 + k) for k in range(1, stage.max_extensions + 1)]
    return ([v for v in low if stage.floor is None or v >= stage.floor]
            + [v for v in high if stage.ceiling is None or v <= stage.ceiling])


def separation(per_seed: Mapping[float, Mapping[str, float]], best: float,
               metric: str = "fid") -> dict[str, Any] | None:
    """The winner against the runner-up (the next-best mean in `metric`'s direction), paired by
    tuning seed: the choice keeps the best mean, this says whether the seeds could tell the two apart."""
    _, means = choose_by_seed(per_seed, metric)
    rest = {v: m for v, m in means.items() if v != best and math.isfinite(m)}
    if best not in per_seed or not rest:
        return None
    runner_up = ranked(rest, rest.get, metric)[0]
    c = paired(per_seed[best], per_seed[runner_up], direction=direction(metric))
    return {"winner": best, "runner_up": runner_up, "estimate": c.estimate, "low": c.low, "high": c.high,
            "n": c.n, "separated": bool(c.significant and c.outcome == "better")}


def separation_words(sep: Mapping[str, Any] | None, unit: str = "FID") -> str:
    """`separated (…)` / `not separated (difference X [lo, hi] …)`, or why it cannot be told."""
    if not sep:
        return "no runner-up (one value finished)"
    if sep["n"] < 2 or not (math.isfinite(sep["low"]) and math.isfinite(sep["high"])):
        return f"not testable ({sep['n']} tuning seed(s) both finished; a paired interval needs >= 2)"
    diff = (f"difference {sep['estimate']:+.3g} [{sep['low']:+.3g}, {sep['high']:+.3g}] {unit}, winner − "
            f"runner-up paired by tuning seed, n={sep['n']}")
    return f"separated ({diff})" if sep["separated"] else f"not separated ({diff})"


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


def choose(values: Mapping[float, Sequence[float]], metric: str = "fid") -> tuple[float | None, dict[float, float]]:
    """The value with the best mean `metric` over the tuning seeds (lowest, or highest for a
    higher-is-better metric; failed trials left out: a value whose every trial failed cannot
    win). Returns (best or None, mean per value)."""
    means = {}
    for value, metrics in values.items():
        finite = [m for m in metrics if m is not None and math.isfinite(m)]
        means[value] = sum(finite) / len(finite) if finite else math.nan
    ok = {v: m for v, m in means.items() if math.isfinite(m)}
    return (ranked(ok, ok.get, metric)[0] if ok else None), means


def choose_by_seed(per_seed: Mapping[float, Mapping[str, float]],
                   metric: str = "fid") -> tuple[float | None, dict[float, float]]:
    """`choose` over a round's record: value -> {tuning seed: its score at the study's endpoint}."""
    return choose({v: list(m.values()) for v, m in per_seed.items()}, metric)


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
    lowest = "lowest" if direction(record.get("metric") or "fid") == MIN else "highest"
    endpoint = record.get("endpoint", "final")          # a record from before study.endpoint: the final value
    lines = ["## Protocol: tune, then repeat", "",
             f"Each group runs at its own best `{key}`, chosen in stage 1 by the {lowest} mean {endpoint} "
             f"{record.get('metric', 'FID')} on tuning seeds {record.get('seeds', '?')} (not the seeds above), "
             f"{record.get('search', '?')} search over [{record.get('low', '?')}, {record.get('high', '?')}]"
             f"{' (log scale)' if record.get('log') else ''}, on this study's budget"
             + (f"; a grid winner at an edge of the range got one more value one grid step beyond it, up to "
                f"{record['max_extensions']} round(s) (`study.protocol.tune.max_extensions`)"
                if "max_extensions" in record else "")
             + ". The groups are therefore compared at their own best settings, not at one shared value.", "",
             f"| group | chosen {key} | stage-1 mean {endpoint} FID per {key} (tried) | stage-1 report |",
             "|---|---|---|---|"]
    edges: list[str] = []
    notes: list[str] = []
    for group, values in study["tuned"].items():
        info = record.get("groups", {}).get(group, {})
        tried = ", ".join(f"{v}: {m:.1f}" if math.isfinite(m) else f"{v}: failed"
                          for v, m in sorted((float(v), m) for v, m in info.get("means", {}).items()))
        tried_values = sorted(float(v) for v in info.get("means", {}))
        chosen = values.get(key, "?")
        edge = len(tried_values) > 1 and chosen in (tried_values[0], tried_values[-1])
        edges += [group] if edge else []
        lines.append(f"| {group} | {chosen}{' (edge)' if edge else ''} | {tried or '?'} | {info.get('report', '?')} |")
        notes += _group_notes(group, info, record)
    if notes:
        lines += ["", *notes]
    if edges:
        ends = [float(v) for info in record.get("groups", {}).values() for v in info.get("means", {})]
        span = f"[{min(ends):g}, {max(ends):g}]" if ends else f"[{record.get('low')}, {record.get('high')}]"
        lines += ["", f"At the edge of the searched range for {', '.join(edges)}: the best value may lie outside "
                  f"{span}; widen `study.protocol.tune` (or raise its `max_extensions`) to find out."]
    return lines + [""]


def _group_notes(group: str, info: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    """A group's range extension and whether its winner is separated from the runner-up (records
    written before either was kept say nothing of them)."""
    out = []
    rounds, stop = info.get("extensions") or [], info.get("stop")
    if rounds:
        side = rounds[0]["side"]
        first = float(record.get("low" if side == "low" else "high", math.nan))
        words = (f"range extended {'below' if side == 'low' else 'above'} {first:g} to "
                 f"{rounds[-1]['value']:g} ({len(rounds)} round{'s' if len(rounds) > 1 else ''}): ")
        out.append(f"- {group}: " + words + (f"winner {info.get('chosen', '?')} now interior." if stop == "interior"
                                               else _still_at_edge(stop, len(rounds), record)))
    elif stop and stop != "interior":
        out.append(f"- {group}: at the edge, not extended: " + _still_at_edge(stop, 0, record))
    if "separation" in info:
        sep = info["separation"]
        pair = f"{sep['winner']:g} vs runner-up {sep['runner_up']:g}: " if sep else ""
        out.append(f"- {group}: winner {pair}{separation_words(sep)}.")
    return out


def _still_at_edge(stop: str | None, rounds: int, record: Mapping[str, Any]) -> str:
    why = {"cap": f"cap, `study.protocol.tune.max_extensions`={record.get('max_extensions', '?')}",
           "floor": f"the next step is below `floor` {record.get('floor')}",
           "ceiling": f"the next step is above `ceiling` {record.get('ceiling')}",
           "grid only": "only a grid tuning stage extends its range",
           "resolution": "the next step rounds to a value already tried"}.get(stop or "", stop or "?")
    return f"still at the edge after {rounds} extension{'' if rounds == 1 else 's'} ({why})."


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
