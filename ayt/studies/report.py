"""The study report, built from what the study's MLflow runs hold (the source of truth after
any resume): FID curves against images seen grouped by the swept values, final/best FID
with 95% confidence intervals across seeds, iterations to reach a target FID, and each
group against its reference (unpaired and, where seeds are shared, paired: `stats`).

Files under out_dir/<study>/: report.md, fid_1step.png, fid_2step.png, final_vs_axis.png,
trials.csv (one row per trial), curves.csv (one row per evaluation), groups.csv; and, where
trials logged tangent diagnostics, tangent.png and tangent.csv (`report_tangent`).
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from ayt.metrics import FID_KEYS, TRAIN_SECONDS, short
from ayt.provenance import CODE_VERSIONS_TAG, git_commit, short_version
from ayt.studies.protocol import TUNING_FILE
from ayt.studies.critical_batch import noise_keys, section as critical_batch_section, target_scope
from ayt.studies.protocol import report_lines as protocol_lines
from ayt.studies.report_rows import group_label, write_rows as _write_rows
from ayt.studies.report_tangent import history_keys, tangent_files
from ayt.studies.stats import Comparison, mean_ci, paired, unpaired
from ayt.training.noise_scale import NOISE_SCALE

CURVES = FID_KEYS
DIVERGED_RISE = 0.10   # an FID more than 10% above its first evaluation, to the end, is a divergence


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
    failure: str | None = None      # the reason a failed trial gave (ayt.failure tag)
    code_versions: tuple[str, ...] = ()   # the code that trained it, in order (more than one: resumed on new code)

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

    def divergence(self, key: str) -> str | None:
        """Why this trial counts as diverged, or None. Diverged: it failed on a non-finite loss,
        or its FID rose above its first evaluation by more than DIVERGED_RISE and stayed there
        (the last two evaluations, or the last one when there are only two)."""
        if self.failure and ("non-finite" in self.failure.lower() or "nan" in self.failure.lower()):
            return self.failure.split(":", 1)[-1].strip()[:160] or "non-finite loss"
        curve = [v for _, v in self.curves.get(key, [])]
        if len(curve) < 2:
            return None
        tail = curve[-2:] if len(curve) > 2 else curve[-1:]
        if all(v > curve[0] * (1 + DIVERGED_RISE) for v in tail):
            return f"{short(key)} rose from {curve[0]:.1f} (first evaluation) to {curve[-1]:.1f} and stayed above it"
        return None

    def first_reaching(self, key: str, target: float) -> int | None:
        """First evaluated iteration whose FID is at or below the target (None: never)."""
        return next((s for s, v in self.curves.get(key, []) if v <= target), None)


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
                                                          key=lambda m: m.step)]
                  for key in (*CURVES, *history_keys(run.data.metrics), *noise_keys(run.data.metrics))}
        trials.append(Trial(run.info.run_id, run.info.run_name, axes, int(params.get("batch_size", 0)),
                            run.info.status, run.data.tags.get("ayt.stopped_early") == "true", curves,
                            run.data.metrics.get(TRAIN_SECONDS),
                            {k[len("artifact."):]: v for k, v in params.items() if k.startswith("artifact.")},
                            failure=run.data.tags.get("ayt.failure"),
                            code_versions=tuple(v for v in run.data.tags.get(CODE_VERSIONS_TAG, "").split(",") if v)))
    return sorted(trials, key=lambda t: (_sort_key(t.group), t.seed))


def _sort_key(group) -> tuple:
    return tuple((k, float(v)) if _is_number(v) else (k, math.inf, v) for k, v in group)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


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
    critical = critical_batch_section(trials, key, out, plan.name,      # batch-size sweeps only
                                      scope=target_scope(plan.study))
    files.append(_write_markdown(plan, trials, groups, tgt, key, out / "report.md", [Path(f).name for f in files],
                                 wall, critical.lines))
    files += critical.files
    if plan.study.get("tuned") and (out / TUNING_FILE).is_file():
        files.append(str(out / TUNING_FILE))
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


def _compare_with_reference(rows, by_group, study, key, tgt) -> None:
    """Each group against its reference (the same group with `study.target.reference`
    substituted): final FID unpaired (Welch) and paired by seed, and images seen to the
    target FID. The records go in `row["comparisons"]`; the CSV gets their verdicts."""
    reference = {k: str(v) for k, v in ((study.get("target") or {}).get("reference") or {}).items()}
    if not reference:
        return
    index = {row["group"]: (row, members) for row, members in zip(rows, by_group.values())}
    for (group, members), row in zip(by_group.items(), rows):
        ref_label = group_label(tuple((k, reference.get(k, v)) for k, v in group))
        if ref_label not in index:
            row["vs_reference"] = "–"
            continue
        other, ref_members = index[ref_label]
        if other is row:
            row["vs_reference"] = "reference"
            continue
        finals = {t.seed: t.final(key) for t in members}
        ref_finals = {t.seed: t.final(key) for t in ref_members}
        comparisons: dict[str, Comparison] = {
            "final": unpaired(list(finals.values()), list(ref_finals.values())),
            "final_paired": paired(finals, ref_finals)}
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


def _write_trials_csv(trials: list[Trial], tgt: dict, key: str, path: Path) -> str:
    rows = []
    for t in trials:
        target = tgt.get(t.group)
        reached = t.first_reaching(key, target) if target is not None else None
        rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "status": t.status,
                     "stopped_early": t.stopped_early, "iterations": t.curves[key][-1][0] if t.curves.get(key) else 0,
                     **{f"final_{short(k)}": t.final(k) for k in CURVES},
                     **{f"best_{short(k)}": t.best(k) for k in CURVES},
                     "target_fid": target, "iters_to_target": reached, "train_seconds": t.train_seconds,
                     "code_versions": " ".join(t.code_versions), **{f"artifact.{k}": v for k, v in t.artifacts.items()}})
    return _write_rows(rows, path)


def _write_curves_csv(trials: list[Trial], path: Path) -> str:
    """One row per evaluation: the FID curves, and the noise scale where the study measured it."""
    keys = (*CURVES, *((NOISE_SCALE,) if any(t.curves.get(NOISE_SCALE) for t in trials) else ()))
    rows = []
    for t in trials:
        steps = sorted({s for k in CURVES for s, _ in t.curves.get(k, [])})
        values = {k: dict(t.curves.get(k, [])) for k in keys}
        for s in steps:
            rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "iteration": s,
                         "images_seen": s * t.batch_size, **{short(k): values[k].get(s) for k in keys}})
    return _write_rows(rows or [{"run": None}], path)


def _plots(trials: list[Trial], out: Path, plan) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    groups = list(dict.fromkeys(t.group for t in trials))
    styles = _group_styles(groups, plt)
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for group in groups:
            members = [t for t in trials if t.group == group and t.curves.get(key)]
            if not members:
                continue
            style = styles[group]
            for t in members:       # each seed thin, the mean over seeds bold
                ax.plot([s * t.batch_size for s, _ in t.curves[key]], [v for _, v in t.curves[key]],
                        color=style["color"], linestyle=style["linestyle"], alpha=0.3, linewidth=0.8)
            steps = sorted(set.intersection(*[{s for s, _ in t.curves[key]} for t in members]))
            if steps:
                mean = [np.mean([dict(t.curves[key])[s] for t in members]) for s in steps]
                ax.plot([s * members[0].batch_size for s in steps], mean, linewidth=2, marker=style["marker"],
                        markersize=4, label=group_label(group), color=style["color"], linestyle=style["linestyle"])
        ax.set_xlabel("images seen")
        ax.set_ylabel(short(key).replace("_", " ").upper().replace("STEP", "-step"))
        ax.set_yscale("log")
        ax.set_title(f"{plan.name}: {short(key)} (thin: seeds, bold: mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{short(key)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    files += _final_vs_first_axis(trials, out, plan, plt)
    files += tangent_files(trials, out, plan, plt, styles)
    return files


def _group_styles(groups: list[tuple], plt) -> dict[tuple, dict[str, Any]]:
    """Colour by the first categorical axis (e.g. the loss), line style and marker by the
    first numeric one (e.g. the batch size), so related curves read as families."""
    if not groups:
        return {}
    keys = [k for k, _ in groups[0]]
    numeric = [k for k in keys if all(_is_number(dict(g).get(k)) for g in groups)]
    categorical = [k for k in keys if k not in numeric]
    colour_key = categorical[0] if categorical else (numeric[0] if len(numeric) == 1 else None)
    style_key = next((k for k in numeric if k != colour_key), None)
    colour_values = list(dict.fromkeys(dict(g).get(colour_key) for g in groups)) if colour_key else []
    style_values = sorted({dict(g).get(style_key) for g in groups}, key=float) if style_key else []
    palette = plt.get_cmap("tab10")
    dashes, markers = ["-", "--", "-.", ":"], ["o", "s", "^", "D", "v", "P"]
    styles = {}
    for i, g in enumerate(groups):
        c = colour_values.index(dict(g).get(colour_key)) if colour_key else i
        k = style_values.index(dict(g).get(style_key)) if style_key else 0
        styles[g] = {"color": palette(c % 10), "linestyle": dashes[k % len(dashes)],
                     "marker": markers[k % len(markers)]}
    return styles


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
        ax.set_ylabel(f"final {short(key)} (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{plan.name}: final FID vs {x_key}")
    fig.tight_layout()
    path = out / "final_vs_axis.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def _write_markdown(plan, trials, groups, tgt, key, path: Path, figures: list[str],
                    wall_seconds: float | None = None, sections: Sequence[str] = ()) -> str:
    extractors = sorted({t.artifacts.get("fid_classifier_hash") or t.artifacts.get("fid_extractor", "?") for t in trials})
    accuracy = sorted({t.artifacts["fid_classifier_test_accuracy"] for t in trials
                       if "fid_classifier_test_accuracy" in t.artifacts})
    worker_minutes = sum(t.train_seconds or 0 for t in trials) / 60
    # The command without this machine's paths: the out_dir (and what is under it) as `<out_dir>`,
    # or relative when it lies under the working directory, and any path under that relative.
    cwd, command = Path.cwd(), " ".join(plan.argv)
    out_dir = Path(str(plan.base.out_dir))
    for root in sorted({out_dir, out_dir.resolve()}, key=lambda p: -len(str(p))):
        mark = str(root.relative_to(cwd)) if root.is_relative_to(cwd) else "<out_dir>"
        command = re.sub(re.escape(str(root)) + r"(?![\w.\-])", mark, command)
    for root in {cwd, cwd.resolve()}:
        command = command.replace(f"{root}/", "")
    lines = [f"# Study `{plan.name}` ({plan.study_id})", "",
             f"- command: `python -m ayt.studies.{plan.module} {command}`",
             f"- report written by commit `{git_commit()}`; study config hash: `{plan.study_id.rsplit('-', 1)[1]}`",
             code_line(trials),
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
             "Against the reference: the difference group − reference with its 95% interval and p "
             "(Welch t on the seeds of each group; paired t on the seeds both share, with the exact "
             "Wilcoxon signed-rank p beside it); significant when the interval excludes 0.", ""]
    columns = [c for c in TABLE if c.shown(groups)]
    lines += ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(r, key) for c in columns) + " |" for r in groups]
    if plan.skipped:
        lines += ["", "Skipped: " + "; ".join(plan.skipped)]
    lines += ([""] + protocol_lines(plan.study, Path(plan.out_dir))) if plan.study.get("tuned") else []
    lines += ["", "## Findings (computed)", ""] + _findings(groups, key)
    lines += _diverged_lines(trials, key)
    lines += list(sections)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures if f.endswith(".png")]
    lines += ["", "## Data", "", "`trials.csv` (one row per trial), `curves.csv` (every evaluation), "
              "`groups.csv` (the table above with full precision).", ""]
    path.write_text("\n".join(lines))
    return str(path)


def code_line(trials: Sequence[Trial]) -> str:
    """Which code trained the trials: one version, or each version with its trials' count and
    the trials that ran on more than one (a study resumed on new code, allow_code_change)."""
    counts: dict[str, int] = {}
    for t in trials:
        for version in t.code_versions or ("unrecorded",):
            counts[version] = counts.get(version, 0) + 1
    listed = ", ".join(f"`{short_version(v)}` ({n} trial{'s' * (n != 1)})" for v, n in counts.items())
    if len(counts) <= 1:
        return f"- code that trained the trials: {listed or 'none recorded'}"
    mixed = [f"`{t.name}` ({' then '.join(short_version(v) for v in t.code_versions)})"
             for t in trials if len(t.code_versions) > 1]
    return (f"- **code differs between trials**: {len(counts)} versions, {listed}"
            + (f"; trained on more than one: {', '.join(mixed)}" if mixed else ""))


def _diverged_lines(trials: list[Trial], key: str) -> list[str]:
    """Every diverged trial by name, so none is averaged in (or dropped) silently."""
    bad = [(t, t.divergence(key)) for t in trials]
    bad = [(t, why) for t, why in bad if why]
    if not bad:
        return ["", f"Diverged trials: none (a non-finite loss, or {short(key)} more than "
                f"{DIVERGED_RISE:.0%} above its first evaluation to the end)."]
    return ["", f"## Diverged trials ({len(bad)} of {len(trials)})", "",
            "A trial that failed on a non-finite loss has no final FID and is missing from its group's "
            f"mean; one whose {short(key)} rose and stayed up is in the mean (it is what that setting did).", ""] + \
        [f"- {group_label(t.group)}, seed {t.seed} (`{t.name}`): {why}" for t, why in bad]


@dataclass(frozen=True)
class Column:
    """One column of the report's group table: its header, how a row renders in it, and
    which rows' keys make it appear at all."""

    header: str
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


TABLE = [
    Column("group", lambda r, key: r["group"]),
    Column("seeds", lambda r, key: r["seeds"]),
    Column("start FID 1-step / 2-step (converged model)",
           lambda r, key: f"{r['converged_fid_1step']:.2f} / {r.get('converged_fid_2step', math.nan):.2f}",
           needs="converged_fid_1step"),
    Column("final FID 1-step", _stat("final_fid_1step")),
    Column("final FID 2-step", _stat("final_fid_2step")),
    Column("best FID 1-step", _stat("best_fid_1step")),
    Column("best FID 2-step", _stat("best_fid_2step")),
    Column("diverged", lambda r, key: r.get("diverged") or "0", needs="diverged"),
    Column("feature-map label MSE", lambda r, key: fmt(r.get("feature_map_label_mse", math.nan), math.nan, 4),
           needs="feature_map_label_mse"),
    Column("feature-map held-out R² (geo / clr / deg)", lambda r, key: _joined(r, "feature_map_r2_", FM_FAMILIES),
           needs="feature_map_r2"),
    Column("feature-map training images", lambda r, key: f"{r['feature_map_train_images']:,.0f}"
           if r.get("feature_map_train_images") is not None else "–", needs="feature_map_train_images"),
    Column("MFD step cosine (" + " / ".join(FM_ERRORS) + ")", lambda r, key: _joined(r, "feature_map_align_", FM_ERRORS),
           needs="feature_map_align_noise"),
    Column("target FID", lambda r, key: fmt(r["target_fid"], math.nan) if r.get("target_fid") is not None else "–",
           needs="target_fid"),
    Column("iterations to target (reached)",
           lambda r, key: f"{_stat('iters_to_target', 0)(r, key)} ({r.get('reached', 0)}/{r['seeds']})",
           needs="target_fid"),
    Column("images to target", _stat("images_to_target", 0), needs="target_fid"),
    Column("speed-up vs reference", _speedup, needs="target_fid"),
    Column("final FID vs reference", lambda r, key: r.get("vs_reference", "–"), needs="vs_reference"),
    Column("paired by seed", lambda r, key: r.get("paired_vs_reference", "–"), needs="paired_vs_reference"),
    Column("images to target vs reference", lambda r, key: r.get("speed_vs_reference", "–"), needs="target_fid"),
]


def _findings(groups: list[dict[str, Any]], key: str) -> list[str]:
    """Plain sentences from the comparison records: the best group, every significant
    difference, and what is missing when nothing can be tested."""
    name = short(key)
    finite = [r for r in groups if math.isfinite(r.get(f"final_{name}_mean", math.nan))]
    if not finite:
        return ["- No trial produced an FID curve."]
    best = min(finite, key=lambda r: r[f"final_{name}_mean"])
    out = [f"- Lowest final {name}: {best['group']} "
           f"({fmt(best[f'final_{name}_mean'], best[f'final_{name}_ci95'])}, {best['seeds']} seeds)."]
    compared = [r for r in groups if r.get("comparisons")]
    labels = {"final": f"final {name} (Welch)", "final_paired": f"final {name} (paired by seed)",
              "images_to_target": "images to target"}
    for r in compared:
        significant = [f"{labels[what]} {c.verdict('faster', 'slower') if what == 'images_to_target' else c.verdict()}"
                       for what, c in r["comparisons"].items() if c.significant]
        if significant:
            speed = r.get("speedup_vs_reference")
            out.append(f"- {r['group']} vs reference — " + "; ".join(significant)
                       + (f" (speed-up {speed:.2f}×)" if speed else "") + ".")
    if not compared:
        return out
    if all(not c.available for r in compared for c in r["comparisons"].values()):
        out.append("- No comparison with the reference can be tested: "
                   + (next(iter(compared[0]["comparisons"].values())).method) + ".")
    elif len(out) == 1:
        out.append("- No difference from the reference group is significant at 95%.")
    return out


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
