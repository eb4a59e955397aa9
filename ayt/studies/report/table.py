"""The report's group table and what it is computed from: final/best value of every metric the
trials log (FID, KID, precision, ...) with 95% confidence intervals across seeds, iterations and
images to a target, and each group against its reference (unpaired and, where seeds are shared,
paired: `stats`); the findings are sentences from the same comparison records. Which way is
better is each metric's declaration (`ayt.eval.metrics`), never assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ayt.eval.metrics import MIN, direction, label, metric_keys_in, quantity_of, ranked
from ayt.metrics import FID_KEYS, short
from ayt.studies.protocols import decision as decisions
from ayt.studies.engine.group import Group
from ayt.studies.report.stats import Comparison, mean_ci, paired, unpaired
from ayt.studies.engine.trials import Trial

CURVES = FID_KEYS         # the curves of a study that logged none (every trial failed before evaluating)


def curve_keys(trials: Sequence[Trial], key: str | None = None) -> list[str]:
    """The registered metric curves the trials logged (`eval/fid_1step`, `eval/kid_2step`, ...),
    in the registry's order, with the study metric `key`; FID's where none has any."""
    found = metric_keys_in({k for t in trials for k in t.curves} | ({key} if key else set()))
    return found or list(CURVES)


def fmt(mean: float, half: float, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def _reference(study: dict[str, Any]) -> dict[str, str]:
    """`study.target.reference`: the values that turn a group into its reference group."""
    return {k: str(v) for k, v in ((study.get("target") or {}).get("reference") or {}).items()}


def targets(trials: list[Trial], study: dict[str, Any], key: str) -> dict[Group, float | None]:
    """Target FID per group: `study.target.fid`, or the reference group's mean score at the
    study's endpoint (the same group with `study.target.reference` values substituted)."""
    target = study.get("target") or {}
    groups = {t.group for t in trials}
    if target.get("fid") is not None:
        return {g: float(target["fid"]) for g in groups}
    reference = _reference(study)
    if not reference:
        return {g: None for g in groups}
    endpoint = decisions.of(study).endpoint
    finals: dict[Group, list[float]] = {}
    for t in trials:
        finals.setdefault(t.group, []).append(t.score(key, endpoint))
    out = {}
    for g in groups:
        ref = g.replace(reference)
        out[g] = mean_ci(finals[ref])[0] if ref in finals else None
    return out


def group_rows(trials: list[Trial], tgt: dict, key: str, study: dict) -> list[dict[str, Any]]:
    """One row per group: each curve's final and best (and its score at the study's endpoint,
    `<endpoint>_<curve>_mean`, when that is not the final value), artifacts, divergence, time to
    the target, and its comparisons with the reference."""
    by_group: dict[Group, list[Trial]] = {}
    for t in trials:
        by_group.setdefault(t.group, []).append(t)
    endpoint = decisions.of(study).endpoint
    scored = [("final", Trial.final), ("best", Trial.best)]
    if endpoint.name != "final":
        scored.insert(0, (endpoint.label, lambda t, k: t.score(k, endpoint)))
    rows = []
    for group, members in by_group.items():
        row: dict[str, Any] = {"group": group.label, "seeds": len(members)}
        for k in curve_keys(trials, key):
            for what, fn in scored:
                m, h, _ = mean_ci([fn(t, k) for t in members])
                row[f"{what}_{short(k)}_mean"], row[f"{what}_{short(k)}_ci95"] = m, h
        for name in ARTIFACT_KEYS:         # artifact metadata (artifact.* params), averaged over seeds
            values = [float(t.artifacts[name]) for t in members if name in t.artifacts]
            if values:
                row[name] = float(np.mean(values))
        diverged = [t for t in members if t.divergence(key)]
        if diverged:
            row["diverged"] = f"{len(diverged)}/{len(members)}"
        target = tgt.get(group)
        row["target_fid"] = target
        if target is not None:
            reached = [t.first_reaching(key, target) for t in members]
            m, h, n = mean_ci([r for r in reached if r is not None])
            row["iters_to_target_mean"], row["iters_to_target_ci95"], row["reached"] = m, h, n
            batch = members[0].batch_size
            row["images_to_target_mean"] = m * batch if math.isfinite(m) else math.nan
            row["images_to_target_ci95"] = h * batch if math.isfinite(h) else math.nan
        rows.append(row)
    _compare_with_reference(rows, by_group, study, key, tgt)
    return rows


def _compare_with_reference(rows, by_group: dict[Group, list[Trial]], study, key, tgt) -> None:
    """Each group against its reference (the same group with `study.target.reference`
    substituted): the score at the study's endpoint unpaired (Welch) and paired by seed, at the
    level the study decides at (its seed rounds' looks), and images seen to the target FID. The
    records go in `row["comparisons"]` ("final", "final_paired": the study's score); the CSV gets
    their verdicts."""
    reference = _reference(study)
    if not reference:
        return
    decision = decisions.of(study)
    index = {group: (row, members) for (group, members), row in zip(by_group.items(), rows)}
    for (group, members), row in zip(by_group.items(), rows):
        ref = group.replace(reference)
        if ref not in index:
            row["vs_reference"] = "–"
            continue
        other, ref_members = index[ref]
        if other is row:
            row["vs_reference"] = "reference"
            continue
        finals = {t.seed: t.score(key, decision.endpoint) for t in members}
        ref_finals = {t.seed: t.score(key, decision.endpoint) for t in ref_members}
        way = direction(key)
        comparisons: dict[str, Comparison] = {
            "final": unpaired(list(finals.values()), list(ref_finals.values()), direction=way, looks=decision.looks),
            "final_paired": paired(finals, ref_finals, direction=way, looks=decision.looks)}
        row["vs_reference"] = comparisons["final"].verdict()
        row["paired_vs_reference"] = comparisons["final_paired"].verdict()
        # Speed on the x-axis that is fair across batch sizes: images seen to the target FID.
        target = tgt.get(group)
        if target is not None and "images_to_target_mean" in row and "images_to_target_mean" in other:
            mine = [_images_to(t, key, target) for t in members]
            theirs = [_images_to(t, key, tgt.get(t.group)) for t in ref_members]
            reached, ref_reached = sum(v is not None for v in mine), sum(v is not None for v in theirs)
            if reached < row["seeds"]:
                row["speed_vs_reference"] = f"reached the target in {reached}/{row['seeds']} seeds"
            elif ref_reached < 2:         # the reference's own time to target has no interval
                row["speed_vs_reference"] = f"reference reached the target in {ref_reached}/{other['seeds']} seeds"
            else:
                comparisons["images_to_target"] = unpaired(mine, theirs)
                row["speed_vs_reference"] = comparisons["images_to_target"].verdict("faster", "slower")
                mean_mine, mean_theirs = row["images_to_target_mean"], other["images_to_target_mean"]
                if reached >= 2 and mean_mine > 0 and math.isfinite(mean_theirs):
                    row["speedup_vs_reference"] = mean_theirs / mean_mine
        row["comparisons"] = comparisons


def _images_to(trial: Trial, key: str, target: float | None) -> float | None:
    if target is None:
        return None
    reached = trial.first_reaching(key, target)
    return None if reached is None else float(reached * trial.batch_size)


@dataclass(frozen=True)
class Column:
    """One column of the report's group table: its header, how a row renders in it, and
    which rows' keys make it appear at all."""

    header: str                                    # "{metric}": the study metric's name (FID, KID, precision)
    render: Any                                    # (row, metric key) -> str
    needs: str | None = None                       # shown only if some row has this key

    def shown(self, rows: list[dict[str, Any]]) -> bool:
        return self.needs is None or any(r.get(self.needs) is not None for r in rows)

    def cell(self, row: dict[str, Any], key: str) -> str:
        return str(self.render(row, key))


def _stat(name: str, digits: int = 2):
    return lambda r, key: fmt(r.get(f"{name}_mean", math.nan), r.get(f"{name}_ci95", math.nan), digits)


def _speedup(r: dict[str, Any], key: str) -> str:
    speedup = r.get("speedup_vs_reference")
    return f"{speedup:.2f}×" if speedup else "–"


FM_FAMILIES = ("geo", "clr", "deg")
FM_ERRORS = ("noise", "blur", "mixup", "shift", "mean")     # ayt.training.alignment.ERRORS
FEATURE_MAP_KEYS = ("feature_map_label_mse", "feature_map_r2", "feature_map_train_images",
                    *(f"feature_map_r2_{f}" for f in FM_FAMILIES), *(f"feature_map_align_{e}" for e in FM_ERRORS))
CONVERGED_KEYS = ("converged_fid_1step", "converged_fid_2step")     # the fine-tuning regime's start
ARTIFACT_KEYS = (*FEATURE_MAP_KEYS, *CONVERGED_KEYS)


def _joined(r: dict[str, Any], prefix: str, names: Sequence[str]) -> str:
    return " / ".join(f"{r[prefix + n]:.2f}" if r.get(prefix + n) is not None else "–" for n in names)


def _verdict(r: dict[str, Any], key: str) -> str:
    """The group against its reference in one cell: paired by seed where the seeds allow it, else
    Welch; the direction, the difference with its 95% interval, the test and n (p, the Wilcoxon p
    and the power are in the table of both tests)."""
    found = r.get("comparisons") or {}
    c = next((c for c in (found.get("final_paired"), found.get("final")) if c is not None and c.available),
             found.get("final"))
    if c is None:
        return r.get("vs_reference", "–")
    if not c.available:
        return f"n/a ({c.method})"
    level = f" ({c.level:.1%} interval: {c.looks} looks)" if c.looks > 1 else ""
    return f"{c.outcome}: {c.estimate:+.3g} [{c.low:+.3g}, {c.high:+.3g}]{level} ({c.method}, n={c.n})"


@dataclass(frozen=True)
class Table:
    """One of the report's group tables: its heading (none: the first, under the report's
    header) and its columns; shown when a column past the group's has a value."""

    heading: str | None
    columns: list[Column]


GROUP = Column("group", lambda r, key: r["group"])
MAIN_CURVES = Column("{endpoint} {metric} per sampler", None)     # placeholder: `curve_columns` fills it in
OTHER_CURVES = Column("every other curve", None)              # placeholder: `curve_columns` fills it in

# The first table fits a screen: what a reader came for (the final value at each sampler and the
# verdict against the reference). Everything else, in groups.csv too, follows in tables of its own.
TABLES = [
    Table(None, [
        GROUP,
        Column("seeds", lambda r, key: r["seeds"]),
        MAIN_CURVES,
        Column("diverged", lambda r, key: r.get("diverged") or "0", needs="diverged"),
        Column("{endpoint} {metric} vs reference [{level} CI]", _verdict, needs="vs_reference"),
    ]),
    Table("Best values and every other curve", [GROUP, OTHER_CURVES]),
    Table("Time to the target", [
        GROUP,
        Column("target {metric}", lambda r, key: fmt(r["target_fid"], math.nan) if r.get("target_fid") is not None
               else "–", needs="target_fid"),
        Column("iterations to target (reached)",
               lambda r, key: f"{_stat('iters_to_target', 0)(r, key)} ({r.get('reached', 0)}/{r['seeds']})",
               needs="target_fid"),
        Column("images to target", _stat("images_to_target", 0), needs="target_fid"),
        Column("speed-up vs reference", _speedup, needs="target_fid"),
        Column("images to target vs reference", lambda r, key: r.get("speed_vs_reference", "–"), needs="target_fid"),
    ]),
    Table("Against the reference: both tests, with p and power", [
        GROUP,
        Column("{endpoint} {metric} vs reference (Welch)", lambda r, key: r.get("vs_reference", "–"),
               needs="paired_vs_reference"),
        Column("paired by seed", lambda r, key: r.get("paired_vs_reference", "–"), needs="paired_vs_reference"),
    ]),
    Table("Start and feature map", [
        GROUP,
        Column("start FID 1-step / 2-step (converged model)",
               lambda r, key: f"{r['converged_fid_1step']:.2f} / {r.get('converged_fid_2step', math.nan):.2f}"
               if r.get("converged_fid_1step") is not None else "–", needs="converged_fid_1step"),
        Column("feature-map label MSE", lambda r, key: fmt(r.get("feature_map_label_mse", math.nan), math.nan, 4),
               needs="feature_map_label_mse"),
        Column("feature-map held-out R² (geo / clr / deg)", lambda r, key: _joined(r, "feature_map_r2_", FM_FAMILIES),
               needs="feature_map_r2"),
        Column("feature-map training images", lambda r, key: f"{r['feature_map_train_images']:,.0f}"
               if r.get("feature_map_train_images") is not None else "–", needs="feature_map_train_images"),
        Column("MFD step cosine (" + " / ".join(FM_ERRORS) + ")",
               lambda r, key: _joined(r, "feature_map_align_", FM_ERRORS), needs="feature_map_align_noise"),
    ]),
]
TABLE = [c for table in TABLES for c in table.columns if c is not GROUP or table is TABLES[0]]   # every column once


def curve_columns(rows: list[dict[str, Any]], key: str, endpoint: str = "final") -> tuple[list[Column], list[Column]]:
    """The study metric's quantity at each sampler scored at the study's `endpoint` label (the
    first table), and the final of every other curve the rows have with the best of that
    quantity (and its final, when the endpoint is another; a wide table stays readable;
    groups.csv has every best)."""
    curves = metric_keys_in({"eval/" + k[len("final_"):-len("_mean")] for r in rows for k in r
                             if k.startswith("final_") and k.endswith("_mean")})
    own = quantity_of(key).name
    mine = [k for k in curves if quantity_of(k).name == own]
    return ([Column(f"{endpoint} {label(k)}", _stat(f"{endpoint}_{short(k)}")) for k in mine],
            [Column(f"final {label(k)}", _stat(f"final_{short(k)}"))
             for k in curves if k not in mine or endpoint != "final"]
            + [Column(f"best {label(k)}", _stat(f"best_{short(k)}")) for k in mine])


def table_lines(rows: list[dict[str, Any]], key: str, decision: Any = None) -> list[str]:
    """The group tables in markdown, each with the columns some row has a value for; `decision`
    (ayt/studies/protocols/decision.py) names the endpoint and the level in the headers."""
    endpoint = decision.endpoint.label if decision is not None else "final"
    level = f"{decision.level:.1%}" if decision is not None and decision.looks > 1 else "95%"
    main, other = curve_columns(rows, key, endpoint)
    filled = {id(MAIN_CURVES): main, id(OTHER_CURVES): other}
    name = quantity_of(key).label
    lines: list[str] = []
    for table in TABLES:
        columns = [c for column in table.columns
                   for c in filled.get(id(column), [column] if column.shown(rows) else [])]
        if len(columns) < 2:
            continue
        lines += ["", f"### {table.heading}", ""] if table.heading else []
        lines += (["| " + " | ".join(c.header.replace("{metric}", name).replace("{endpoint}", endpoint)
                                     .replace("{level}", level) for c in columns) + " |",
                   "|" + "---|" * len(columns)]
                  + ["| " + " | ".join(c.cell(r, key) for c in columns) + " |" for r in rows])
    return lines


def findings(groups: list[dict[str, Any]], key: str, decision: Any = None) -> list[str]:
    """Plain sentences from the comparison records: the best group, every significant
    difference, every inconclusive one with what it could have detected, and what is missing
    when nothing can be tested; each names the study's endpoint (`decision`, default final)."""
    name = short(key)
    ep = decision.endpoint.label if decision is not None else "final"
    finite = [r for r in groups if math.isfinite(r.get(f"{ep}_{name}_mean", math.nan))]
    if not finite:
        return [f"- No trial produced a {quantity_of(key).label} curve."]
    best = ranked(finite, lambda r: r[f"{ep}_{name}_mean"], key)[0]
    out = [f"- {'Lowest' if direction(key) == MIN else 'Highest'} {ep} {name}: {best['group']} "
           f"({fmt(best[f'{ep}_{name}_mean'], best[f'{ep}_{name}_ci95'])}, {best['seeds']} seeds)."]
    compared = [r for r in groups if r.get("comparisons")]
    labels = {"final": f"{ep} {name} (Welch)", "final_paired": f"{ep} {name} (paired by seed)",
              "images_to_target": "images to target"}
    for r in compared:
        significant = [f"{labels[what]} {c.verdict('faster', 'slower') if what == 'images_to_target' else c.verdict()}"
                       for what, c in r["comparisons"].items() if c.significant]
        if significant:
            speed = r.get("speedup_vs_reference")
            out.append(f"- {r['group']} vs reference — " + "; ".join(significant)
                       + (f" (speed-up {speed:.2f}×)" if speed else "") + ".")
        unresolved = [f"{labels[what]} {c.power_words()}" for what, c in r["comparisons"].items()
                      if c.outcome == "inconclusive" and c.power_words()]
        if unresolved:
            out.append(f"- {r['group']} vs reference, inconclusive — " + "; ".join(unresolved) + ".")
    if not compared:
        return out
    if all(not c.available for r in compared for c in r["comparisons"].values()):
        out.append("- No comparison with the reference can be tested: "
                   + (next(iter(compared[0]["comparisons"].values())).method) + ".")
    elif not any(c.significant for r in compared for c in r["comparisons"].values()):
        level = (f"{decision.level:.1%} (95% split over the {decision.looks} looks of the seed rounds)"
                 if decision is not None and decision.looks > 1 else "95%")
        out.append(f"- No difference from the reference group is significant at {level}: each is inconclusive, "
                   "with the difference it could detect above.")
    return out
