"""The study report, built from what the study's MLflow runs hold (the source of truth after
any resume): FID curves against images seen grouped by the swept values, final/best FID
with 95% confidence intervals across seeds, and iterations to reach a target FID.

Files under out_dir/<study>/: report.md, fid_1step.png, fid_2step.png, final_vs_axis.png,
trials.csv (one row per trial), curves.csv (one row per evaluation), groups.csv.
"""

from __future__ import annotations

import csv
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

CURVES = ("fid_1step", "fid_2step")


@dataclass
class Trial:
    run_id: str
    name: str
    axes: dict[str, str]            # swept values (seed included), as MLflow stores params
    batch_size: int
    status: str
    stopped_early: bool
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # key -> [(iteration, fid)]
    train_seconds: float | None = None
    artifacts: dict[str, str] = field(default_factory=dict)   # artifact.* params: cache keys, their metrics

    @property
    def seed(self) -> str:
        return self.axes.get("seed", self.axes.get("_seed", "?"))

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.axes.items() if k != "seed")

    def final(self, key: str) -> float:
        return self.curves[key][-1][1] if self.curves.get(key) else math.nan

    def best(self, key: str) -> float:
        return min((v for _, v in self.curves.get(key, [])), default=math.nan)

    def first_reaching(self, key: str, target: float) -> int | None:
        """First evaluated iteration whose FID is at or below the target (None: never)."""
        return next((s for s, v in self.curves.get(key, []) if v <= target), None)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean and half-width of a Student-t confidence interval (nan half-width for n < 2)."""
    from scipy import stats
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def fmt(mean: float, half: float, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def load_trials(uri: str, parent_run_id: str) -> list[Trial]:
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    trials = []
    for run in runs:
        params = run.data.params
        axes = {k[len("axis."):].replace("__", "."): v for k, v in sorted(params.items()) if k.startswith("axis.")}
        if "seed" not in axes:
            axes["seed"] = params.get("seed", "?")
        curves = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                          key=lambda m: m.step)] for key in CURVES}
        trials.append(Trial(run.info.run_id, run.info.run_name, axes, int(params.get("batch_size", 0)),
                            run.info.status, run.data.tags.get("ayt.stopped_early") == "true", curves,
                            run.data.metrics.get("train_seconds"),
                            {k[len("artifact."):]: v for k, v in params.items() if k.startswith("artifact.")}))
    return sorted(trials, key=lambda t: (_sort_key(t.group), t.seed))


def _sort_key(group) -> tuple:
    return tuple((k, float(v)) if _is_number(v) else (k, math.inf, v) for k, v in group)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def group_label(group) -> str:
    return ", ".join(f"{k}={v}" for k, v in group) or "all"


def targets(trials: list[Trial], study: dict[str, Any], key: str) -> dict[tuple, float | None]:
    """Target FID per group: `study.target.fid`, or the mean final FID of the reference group
    (the same group with `study.target.reference` values substituted)."""
    target = study.get("target") or {}
    groups = {t.group for t in trials}
    if target.get("fid") is not None:
        return {g: float(target["fid"]) for g in groups}
    reference = {k: str(v) for k, v in (target.get("reference") or {}).items()}
    if not reference:
        return {g: None for g in groups}
    finals: dict[tuple, list[float]] = {}
    for t in trials:
        finals.setdefault(t.group, []).append(t.final(key))
    out = {}
    for g in groups:
        ref = tuple((k, reference.get(k, v)) for k, v in g)
        out[g] = mean_ci(finals[ref])[0] if ref in finals else None
    return out


def write_report(plan, uri: str, parent_run_id: str) -> dict[str, Any]:
    """Write the report files for the study `plan` from its MLflow runs; returns their paths."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = load_trials(uri, parent_run_id)
    key = plan.metric
    tgt = targets(trials, plan.study, key)
    files = [_write_trials_csv(trials, tgt, key, out / "trials.csv"), _write_curves_csv(trials, out / "curves.csv")]
    groups = _group_rows(trials, tgt, key, plan.study)
    files.append(_write_rows(groups, out / "groups.csv"))
    files += _plots(trials, out, plan)
    started = MlflowClient(uri).get_run(parent_run_id).info.start_time
    wall = time.time() - started / 1000 if started else None
    files.append(_write_markdown(plan, trials, groups, tgt, key, out / "report.md", [Path(f).name for f in files],
                                 wall))
    return {"report": str(out / "report.md"), "files": [str(f) for f in files], "groups": groups,
            "trials": len(trials)}


def _group_rows(trials: list[Trial], tgt: dict, key: str, study: dict) -> list[dict[str, Any]]:
    by_group: dict[tuple, list[Trial]] = {}
    for t in trials:
        by_group.setdefault(t.group, []).append(t)
    rows = []
    for group, members in by_group.items():
        row: dict[str, Any] = {"group": group_label(group), "seeds": len(members)}
        for k in CURVES:
            for what, fn in (("final", Trial.final), ("best", Trial.best)):
                m, h, _ = mean_ci([fn(t, k) for t in members])
                row[f"{what}_{k}_mean"], row[f"{what}_{k}_ci95"] = m, h
        label = [float(t.artifacts["feature_map_label_mse"]) for t in members if "feature_map_label_mse" in t.artifacts]
        if label:
            row["feature_map_label_mse"] = float(np.mean(label))
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
    _mark_significance(rows, by_group, study, key)
    return rows


def _mark_significance(rows, by_group, study, key) -> None:
    """Against the reference group: significant only when the 95% CIs do not overlap."""
    reference = {k: str(v) for k, v in ((study.get("target") or {}).get("reference") or {}).items()}
    if not reference:
        return
    index = {row["group"]: row for row in rows}
    for group, row in zip(by_group, rows):
        ref = group_label(tuple((k, reference.get(k, v)) for k, v in group))
        other = index.get(ref)
        if other is None or other is row:
            row["vs_reference"] = "reference" if other is row else "–"
            continue
        row["vs_reference"] = _compare(row, other, f"final_{key}")
        # Speed on the x-axis that is fair across batch sizes: images seen to the target FID.
        if "images_to_target_mean" in row and "images_to_target_mean" in other:
            mine, theirs = row["images_to_target_mean"], other["images_to_target_mean"]
            if math.isfinite(mine) and math.isfinite(theirs) and mine > 0 and row.get("reached") == row["seeds"]:
                row["speedup_vs_reference"] = theirs / mine
            if row.get("reached") != row["seeds"]:
                row["speed_vs_reference"] = f"reached the target in {row.get('reached', 0)}/{row['seeds']} seeds"
            elif other.get("reached", 0) < 2:           # its seeds that reached it give no interval
                row["speed_vs_reference"] = (f"reference reached the target in "
                                             f"{other.get('reached', 0)}/{other['seeds']} seeds")
            else:
                row["speed_vs_reference"] = _compare(row, other, "images_to_target", lower="faster",
                                                     higher="slower")


def _compare(row: dict, other: dict, prefix: str, lower: str = "better", higher: str = "worse") -> str:
    """Significant only when the two 95% CIs do not overlap (a conservative test)."""
    a = (row.get(f"{prefix}_mean", math.nan), row.get(f"{prefix}_ci95", math.nan))
    b = (other.get(f"{prefix}_mean", math.nan), other.get(f"{prefix}_ci95", math.nan))
    if not all(math.isfinite(v) for v in (*a, *b)):
        return "n/a (needs ≥ 2 finished seeds on both sides)"
    if a[0] + a[1] < b[0] - b[1]:
        return f"{lower} (CIs disjoint)"
    if a[0] - a[1] > b[0] + b[1]:
        return f"{higher} (CIs disjoint)"
    return "not significant"


def _write_rows(rows: list[dict[str, Any]], path: Path) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_trials_csv(trials: list[Trial], tgt: dict, key: str, path: Path) -> str:
    rows = []
    for t in trials:
        target = tgt.get(t.group)
        reached = t.first_reaching(key, target) if target is not None else None
        rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "status": t.status,
                     "stopped_early": t.stopped_early, "iterations": t.curves[key][-1][0] if t.curves.get(key) else 0,
                     **{f"final_{k}": t.final(k) for k in CURVES}, **{f"best_{k}": t.best(k) for k in CURVES},
                     "target_fid": target, "iters_to_target": reached, "train_seconds": t.train_seconds,
                     **{f"artifact.{k}": v for k, v in t.artifacts.items()}})
    return _write_rows(rows, path)


def _write_curves_csv(trials: list[Trial], path: Path) -> str:
    rows = []
    for t in trials:
        steps = sorted({s for k in CURVES for s, _ in t.curves.get(k, [])})
        values = {k: dict(t.curves.get(k, [])) for k in CURVES}
        for s in steps:
            rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "iteration": s,
                         "images_seen": s * t.batch_size, **{k: values[k].get(s) for k in CURVES}})
    return _write_rows(rows or [{"run": None}], path)


def _plots(trials: list[Trial], out: Path, plan) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    groups = list(dict.fromkeys(t.group for t in trials))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, group in enumerate(groups):
            members = [t for t in trials if t.group == group and t.curves.get(key)]
            if not members:
                continue
            colour = colours(i % colours.N)
            for t in members:       # each seed thin, the mean over seeds bold
                ax.plot([s * t.batch_size for s, _ in t.curves[key]], [v for _, v in t.curves[key]],
                        color=colour, alpha=0.3, linewidth=0.8)
            steps = sorted(set.intersection(*[{s for s, _ in t.curves[key]} for t in members]))
            if steps:
                mean = [np.mean([dict(t.curves[key])[s] for t in members]) for s in steps]
                ax.plot([s * members[0].batch_size for s in steps], mean, color=colour, linewidth=2,
                        marker="o", markersize=3, label=group_label(group))
        ax.set_xlabel("images seen")
        ax.set_ylabel(key.replace("_", " ").upper().replace("STEP", "-step"))
        ax.set_yscale("log")
        ax.set_title(f"{plan.name}: {key} (thin: seeds, bold: mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    files += _final_vs_first_axis(trials, out, plan, plt)
    return files


def _final_vs_first_axis(trials, out, plan, plt) -> list[str]:
    """Final FID against the first numeric axis (e.g. batch size), one line per other setting."""
    if not trials:
        return []
    axes = [k for k, _ in trials[0].group]
    numeric = [k for k in axes if all(_is_number(t.axes.get(k)) for t in trials)]
    if not numeric:
        return []
    x_key = numeric[0]
    fig, panels = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, key in zip(panels[0], CURVES):
        lines: dict[tuple, dict[float, list[float]]] = {}
        for t in trials:
            rest = tuple((k, v) for k, v in t.group if k != x_key)
            lines.setdefault(rest, {}).setdefault(float(t.axes[x_key]), []).append(t.final(key))
        for rest, points in lines.items():
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            ax.errorbar(xs, [m for m, _, _ in stats], yerr=[h if math.isfinite(h) else 0 for _, h, _ in stats],
                        marker="o", capsize=3, label=group_label(rest))
        xs_all = [float(t.axes[x_key]) for t in trials]
        if min(xs_all) > 0:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xscale("symlog", linthresh=min((x for x in xs_all if x > 0), default=1.0))
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"final {key} (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{plan.name}: final FID vs {x_key}")
    fig.tight_layout()
    path = out / "final_vs_axis.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def _write_markdown(plan, trials, groups, tgt, key, path: Path, figures: list[str],
                    wall_seconds: float | None = None) -> str:
    from ayt.studies.runner import _git_commit
    has_target = any(r.get("target_fid") is not None for r in groups)
    has_label = any("feature_map_label_mse" in r for r in groups)
    extractors = sorted({t.artifacts.get("fid_classifier_hash") or t.artifacts.get("fid_extractor", "?") for t in trials})
    accuracy = sorted({t.artifacts["fid_classifier_test_accuracy"] for t in trials
                       if "fid_classifier_test_accuracy" in t.artifacts})
    worker_minutes = sum(t.train_seconds or 0 for t in trials) / 60
    lines = [f"# Study `{plan.name}` ({plan.study_id})", "",
             f"- command: `python -m ayt.studies.{plan.module} " + " ".join(plan.argv) + "`",
             f"- git commit: `{_git_commit()}`; study config hash: `{plan.study_id.rsplit('-', 1)[1]}`",
             f"- machine: {platform.node()} ({platform.processor() or platform.machine()}, "
             f"{_cpu_count()} CPUs); written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"- budget: {plan.space.budget_amount} {plan.space.budget_unit} per trial, "
             f"{plan.space.evals} FID evaluations; seeds {plan.space.seeds}; search {plan.space.search}; "
             f"scheduler {plan.study['scheduler']}",
             f"- trials: {len(trials)} ({sum(t.status == 'FINISHED' for t in trials)} finished, "
             f"{sum(t.stopped_early for t in trials)} stopped early, {sum(t.status == 'FAILED' for t in trials)} failed); "
             f"consistency training {worker_minutes:.1f} worker-minutes"
             + (f"; study wall-clock {wall_seconds / 60:.1f} min (first start to this report, pauses included)"
                if wall_seconds else ""),
             f"- FID extractor (cache key): {', '.join(f'`{e}`' for e in extractors)}"
             + (f"; its test accuracy {', '.join(f'{float(a):.3f}' for a in accuracy)}" if accuracy else ""),
             "", "Values are mean ± 95% t-interval half-width across seeds (no ± with one seed). "
             "Significance: the two 95% CIs do not overlap.", ""]
    header = "| group | seeds | final FID 1-step | final FID 2-step | best FID 1-step | best FID 2-step |"
    rule = "|---|---|---|---|---|---|"
    if has_label:
        header, rule = header + " feature-map label MSE |", rule + "---|"
    if has_target:
        header += (" target FID | iterations to target (reached) | images to target | speed-up vs reference |"
                   " FID vs reference | speed vs reference |")
        rule += "---|---|---|---|---|---|"
    lines += [header, rule]
    for r in groups:
        row = (f"| {r['group']} | {r['seeds']} | {fmt(r['final_fid_1step_mean'], r['final_fid_1step_ci95'])} | "
               f"{fmt(r['final_fid_2step_mean'], r['final_fid_2step_ci95'])} | "
               f"{fmt(r['best_fid_1step_mean'], r['best_fid_1step_ci95'])} | "
               f"{fmt(r['best_fid_2step_mean'], r['best_fid_2step_ci95'])} |")
        if has_label:
            row += f" {fmt(r.get('feature_map_label_mse', math.nan), math.nan, 4)} |"
        if has_target:
            t = r.get("target_fid")
            speedup = r.get("speedup_vs_reference")
            row += (f" {fmt(t, math.nan) if t is not None else '–'} | "
                    f"{fmt(r.get('iters_to_target_mean', math.nan), r.get('iters_to_target_ci95', math.nan), 0)}"
                    f" ({r.get('reached', 0)}/{r['seeds']}) | "
                    f"{fmt(r.get('images_to_target_mean', math.nan), r.get('images_to_target_ci95', math.nan), 0)} | "
                    f"{f'{speedup:.2f}×' if speedup else '–'} | {r.get('vs_reference', '–')} | "
                    f"{r.get('speed_vs_reference', '–')} |")
        lines.append(row)
    if plan.skipped:
        lines += ["", "Skipped: " + "; ".join(plan.skipped)]
    lines += ["", "## Findings (computed)", ""] + _findings(groups, key)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures if f.endswith(".png")]
    lines += ["", "## Data", "", "`trials.csv` (one row per trial), `curves.csv` (every evaluation), "
              "`groups.csv` (the table above with full precision).", ""]
    path.write_text("\n".join(lines))
    return str(path)


def _findings(groups: list[dict[str, Any]], key: str) -> list[str]:
    """Plain sentences from the table: the best group, and every significant difference."""
    finite = [r for r in groups if math.isfinite(r.get(f"final_{key}_mean", math.nan))]
    if not finite:
        return ["- No trial produced an FID curve."]
    best = min(finite, key=lambda r: r[f"final_{key}_mean"])
    out = [f"- Lowest final {key}: {best['group']} "
           f"({fmt(best[f'final_{key}_mean'], best[f'final_{key}_ci95'])}, {best['seeds']} seeds)."]
    for r in groups:
        verdicts = [(what, r.get(field, "")) for what, field in (("final FID", "vs_reference"),
                                                                  ("images to target", "speed_vs_reference"))]
        significant = [f"{what}: {v}" for what, v in verdicts if "disjoint" in str(v)]
        if significant:
            speed = r.get("speedup_vs_reference")
            out.append(f"- {r['group']} vs reference — " + "; ".join(significant)
                       + (f" (speed-up {speed:.2f}×)" if speed else "") + ".")
    if len(out) == 1 and any(r.get("vs_reference") not in (None, "reference", "–") for r in groups):
        out.append("- No difference from the reference group is significant at 95% (overlapping CIs).")
    return out


def _cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
