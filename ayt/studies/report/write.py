"""The study report, built from what the study's MLflow runs hold (the source of truth after
any resume; `ayt.studies.engine.trials` loads them once, every `eval/…` and `train/…` history).

The report is `SECTIONS`, a list of `Section`s (ayt/studies/report/section.py) in the order
report.md shows them; each says when it applies and writes its markdown, files and records:

  Header                the command, the code that wrote and trained it, machine, budget, trials
  GroupTable            FID per group with 95% CIs across seeds, iterations and images to the
                        target, each group against its reference (`report_table`); groups.csv
  SearchSection         a sampled study (tpe, random): sampler, top trials, best so far, parameter
                        importance, responses (`report_search`); its per-trial group table left to groups.csv
  ConfirmSection        search_then_confirm: the best found against the baseline on fresh seeds,
                        paired, Holm-adjusted (`confirm`); in the search's report, a link to it
  Protocol              what each group ran at (`study.tuned`) and the tuning it came from
  Findings              the comparison records in sentences, each inconclusive one with its power
  Limits                what the design keeps the study from concluding: curves still falling,
                        losses at one shared lr with different step cosines (`report_limits`)
  SeedRoundsSection     seeds until decisive: the seeds each comparison used and why the rounds stopped
  Diverged              every diverged trial by name
  CriticalBatchSection  B_noise per series and the lr rules (`critical_batch`, batch-size sweeps)
  Tangent               tangent.png, tangent.csv (`report_tangent`, trials with tangent diagnostics)
  Figures               fid_1step.png, fid_2step.png, final_vs_axis.png, and every figure a
                        section before it wrote without showing it itself
  Data                  trials.csv (one row per trial), curves.csv (one row per evaluation, a
                        column per `eval/…` history)

All under out_dir/<study>/, beside report.md.
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Sequence

from ayt.eval.metrics import MIN, direction, label, quantity_of
from ayt.metrics import short
from ayt.provenance import git_commit, short_version
from ayt.studies.protocols.search_then_confirm import ConfirmSection
from ayt.studies.report.critical_batch import CriticalBatchSection
from ayt.studies.protocols import endpoint as endpoints
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.engine.group import Group, is_number
from ayt.studies.protocols.tune_then_repeat import TUNING_FILE
from ayt.studies.protocols.tune_then_repeat import report_lines as protocol_lines
from ayt.studies.report.plots import curve_figure, pyplot
from ayt.studies.report.rows import group_label, write_rows
from ayt.studies.report.search import SearchSection, group_table_note, is_search, per_trial_table
from ayt.studies.report.limits import Limits
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.report.table import TABLE, curve_keys, findings, group_rows, table_lines, targets
from ayt.studies.report.tangent import Tangent
from ayt.studies.protocols.seed_rounds import SeedRoundsSection
from ayt.studies.report.stats import mean_ci
from ayt.studies.engine.trials import DIVERGED_FROM_BEST, DIVERGED_RISE, Trial, load_trials

# Names tests and older callers import from here.
__all__ = ["SECTIONS", "TABLE", "Trial", "code_line", "group_label", "load_trials", "mean_ci", "targets",
           "write_report", "_diverged_lines", "_findings", "_group_rows", "_write_curves_csv"]
_findings, _group_rows = findings, group_rows


class Header(Section):
    """Where the report comes from: command, commits, machine, budget, trials, FID extractor."""

    def write(self, ctx: ReportContext) -> SectionOutput:
        plan, trials = ctx.plan, ctx.trials
        end = ctx.ended_ms / 1000 if ctx.ended_ms else time.time()
        wall = end - ctx.started_ms / 1000 if ctx.started_ms else None
        extractors = sorted({t.artifacts.get("fid_classifier_hash") or t.artifacts.get("fid_extractor", "?")
                             for t in trials})
        accuracy = sorted({t.artifacts["fid_classifier_test_accuracy"] for t in trials
                           if "fid_classifier_test_accuracy" in t.artifacts})
        worker_minutes = sum(t.train_seconds or 0 for t in trials) / 60
        return SectionOutput([
            f"# Study `{plan.name}` ({plan.study_id})", "",
            f"- command: `python -m ayt.studies.{plan.module} {_command(plan)}`",
            f"- report written by commit `{git_commit()}`; study config hash: `{plan.study_id.rsplit('-', 1)[1]}`",
            code_line(trials),
            f"- machine: {platform.node()} ({platform.processor() or platform.machine()}, "
            f"{_cpu_count()} CPUs); written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- budget: {plan.space.budget_amount} {plan.space.budget_unit} per trial, "
            f"{plan.space.evals} FID evaluations; seeds {plan.space.seeds}; search {plan.space.search}; "
            f"scheduler {plan.study['scheduler']}",
            f"- decided at {ctx.decision.words()}: every verdict, ranking and choice below scores each trial "
            "by it (fixed in the study config before it ran)",
            f"- trials: {len(trials)} ({sum(t.status == 'FINISHED' for t in trials)} finished, "
            f"{sum(t.stopped_early for t in trials)} stopped early, {sum(t.status == 'FAILED' for t in trials)} failed); "
            f"consistency training {worker_minutes:.1f} worker-minutes"
            + (f"; study wall-clock {wall / 60:.1f} min (first start to {'its end' if ctx.ended_ms else 'this report'}, "
               "pauses included)" if wall else ""),
            f"- FID extractor (cache key): {', '.join(f'`{e}`' for e in extractors)}"
            + (f"; its test accuracy {', '.join(f'{float(a):.3f}' for a in accuracy)}" if accuracy else "")])


def _command(plan) -> str:
    """The command line without this machine's paths: the out_dir (and what is under it) as
    `<out_dir>`, or relative when it lies under the working directory, and any path under that relative."""
    cwd, command = Path.cwd(), " ".join(plan.argv)
    out_dir = Path(str(plan.base.out_dir))
    for root in sorted({out_dir, out_dir.resolve()}, key=lambda p: -len(str(p))):
        mark = str(root.relative_to(cwd)) if root.is_relative_to(cwd) else "<out_dir>"
        command = re.sub(re.escape(str(root)) + r"(?![\w.\-])", mark, command)
    for root in {cwd, cwd.resolve()}:
        command = command.replace(f"{root}/", "")
    return command


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


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


class GroupTable(Section):
    """The group tables (`report_table.TABLES`: the first fits a screen, the details follow)
    and groups.csv, their rows at full precision."""

    def write(self, ctx: ReportContext) -> SectionOutput:
        decision = ctx.decision
        level = (f"{decision.level:.1%} interval (95% split over the {decision.looks} looks of the seed rounds, "
                 f"its p multiplied by {decision.looks})" if decision.looks > 1 else "95% interval")
        lines = ["", "Values are mean ± 95% t-interval half-width across seeds (no ± with one seed). "
                 f"Against the reference: the difference group − reference in each trial's score at endpoint "
                 f"`{decision.endpoint.label}`, with its {level}, paired by "
                 "seed where the groups share seeds (paired t), else Welch t on the seeds of each group; "
                 "significant when the interval excludes 0. Both tests with p, the exact Wilcoxon signed-rank p "
                 "and their power follow the first table; every column is in groups.csv.", ""]
        lines += table_lines(ctx.rows, ctx.key, decision)
        if per_trial_table(ctx):              # a search: its groups are its trials (report_search)
            lines = group_table_note(ctx)
        if ctx.plan.skipped:
            lines += ["", "Skipped: " + "; ".join(ctx.plan.skipped)]
        return SectionOutput(lines, [write_rows(ctx.rows, ctx.out / "groups.csv")], {"groups": ctx.rows})


class Protocol(Section):
    """Per-group settings (`study.tuned`), and the tuning that chose them (tuning.json)."""

    def applies(self, ctx: ReportContext) -> bool:
        return bool(ctx.plan.study.get("tuned"))

    def write(self, ctx: ReportContext) -> SectionOutput:
        tuning = ctx.out / TUNING_FILE
        return SectionOutput([""] + protocol_lines(ctx.plan.study, ctx.out), [str(tuning)] if tuning.is_file() else [])


class Findings(Section):
    """The comparison records in sentences (a search's best trial is the search section's)."""

    def applies(self, ctx: ReportContext) -> bool:
        return not per_trial_table(ctx)

    def write(self, ctx: ReportContext) -> SectionOutput:
        return SectionOutput(["", "## Findings (computed)", ""] + findings(ctx.rows, ctx.key, ctx.decision))


class Diverged(Section):
    def write(self, ctx: ReportContext) -> SectionOutput:
        return SectionOutput(_diverged_lines(ctx.trials, ctx.key))


def _diverged_lines(trials: list[Trial], key: str) -> list[str]:
    """Every diverged trial by name, so none is averaged in (or dropped) silently."""
    bad = [(t, t.divergence(key)) for t in trials]
    bad = [(t, why) for t, why in bad if why]
    if not bad:
        if direction(key) != MIN:
            return ["", f"Diverged trials: none (a non-finite loss, {short(key)} more than "
                    f"{DIVERGED_RISE:.0%} below its first evaluation to the end, or a final {short(key)} under "
                    f"1/{DIVERGED_FROM_BEST:g} of its best)."]
        return ["", f"Diverged trials: none (a non-finite loss, {short(key)} more than "
                f"{DIVERGED_RISE:.0%} above its first evaluation to the end, or a final {short(key)} more than "
                f"{DIVERGED_FROM_BEST:g}× its best)."]
    return ["", f"## Diverged trials ({len(bad)} of {len(trials)})", "",
            f"A trial that failed on a non-finite loss has no final {quantity_of(key).label} and is missing from its "
            f"group's mean; one whose {short(key)} {'rose and stayed up' if direction(key) == MIN else 'fell and stayed down'} "
            "is in the mean (it is what that setting did).", ""] + \
        [f"- {t.group.label}, seed {t.seed} (`{t.name}`): {why}" for t, why in bad]


class Figures(Section):
    """The FID curves per group (each seed thin, the mean bold) and final FID against the first
    numeric axis; listed with every figure an earlier section wrote but did not show itself."""

    def write(self, ctx: ReportContext) -> SectionOutput:
        files = [curve_figure(ctx.trials, key, ctx.out / f"{short(key)}.png", ylabel=label(key),
                              title=f"{ctx.plan.name}: {short(key)} (thin: seeds, bold: mean)")
                 for key in curve_keys(ctx.trials, ctx.key)]
        if not is_search(ctx.plan):           # a search draws search_response.png instead
            files += _final_vs_first_axis(ctx.trials, ctx.out, ctx.plan)
        shown = files + [f for _, output in ctx.outputs for f in output.files
                         if f.endswith(".png") and f"]({Path(f).name})" not in "\n".join(output.lines)]
        return SectionOutput(["", "## Figures", ""] + [f"![{Path(f).name}]({Path(f).name})" for f in shown], files)


def _final_vs_first_axis(trials: list[Trial], out: Path, plan) -> list[str]:
    """The study metric's score at its endpoint (each sampler) against the first numeric axis
    (e.g. batch size), one line per other setting."""
    if not trials:
        return []
    axes = list(trials[0].group.keys)
    numeric = [k for k in axes if all(is_number(t.axes.get(k)) for t in trials)]
    if not numeric:
        return []
    x_key = numeric[0]
    plt = pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    own, endpoint = quantity_of(plan.metric), endpoints.of(plan.study)
    for ax, key in zip(panels[0], [k for k in curve_keys(trials, plan.metric) if quantity_of(k) == own]):
        lines: dict[Group, dict[float, list[float]]] = {}
        for t in trials:
            lines.setdefault(t.group.without(x_key), {}).setdefault(float(t.axes[x_key]), []).append(
                t.score(key, endpoint))
        for rest, points in lines.items():
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            ax.errorbar(xs, [m for m, _, _ in stats], yerr=[h if math.isfinite(h) else 0 for _, h, _ in stats],
                        marker="o", capsize=3, label=rest.label)
        xs_all = [float(t.axes[x_key]) for t in trials]
        if min(xs_all) > 0:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xscale("symlog", linthresh=min((x for x in xs_all if x > 0), default=1.0))
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{endpoint.label} {short(key)} (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{plan.name}: {endpoint.label} {own.label} vs {x_key}")
    fig.tight_layout()
    path = out / "final_vs_axis.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


class Data(Section):
    """trials.csv and curves.csv."""

    def write(self, ctx: ReportContext) -> SectionOutput:
        files = [_write_trials_csv(ctx.trials, ctx.targets, ctx.key, ctx.out / "trials.csv", ctx.decision.endpoint),
                 _write_curves_csv(ctx.trials, ctx.out / "curves.csv")]
        return SectionOutput(["", "## Data", "", "`trials.csv` (one row per trial), `curves.csv` (every evaluation), "
                              "`groups.csv` (the table above with full precision).", ""], files)


def _write_trials_csv(trials: list[Trial], tgt: dict, key: str, path: Path, endpoint: Endpoint | None = None) -> str:
    """One row per trial; with an endpoint other than the final value, each curve's score at it
    (`last_3_fid_1step`) before its final and best."""
    scored = [] if endpoint is None or endpoint.name == "final" else curve_keys(trials, key)
    rows = []
    for t in trials:
        target = tgt.get(t.group)
        reached = t.first_reaching(key, target) if target is not None else None
        rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "status": t.status,
                     "stopped_early": t.stopped_early, "iterations": t.curves[key][-1][0] if t.curves.get(key) else 0,
                     **{f"{endpoint.label}_{short(k)}": t.score(k, endpoint) for k in scored},
                     **{f"final_{short(k)}": t.final(k) for k in curve_keys(trials, key)},
                     **{f"best_{short(k)}": t.best(k) for k in curve_keys(trials, key)},
                     "target_fid": target, "iters_to_target": reached, "train_seconds": t.train_seconds,
                     "code_versions": " ".join(t.code_versions), **{f"artifact.{k}": v for k, v in t.artifacts.items()}})
    return write_rows(rows, path)


def _write_curves_csv(trials: list[Trial], path: Path) -> str:
    """One row per evaluation (an iteration with any `eval/…` value) and a column per `eval/…`
    history any trial has, in name order; empty where a trial has no value at that iteration."""
    keys = sorted({k for t in trials for k in t.eval_keys()})
    rows = []
    for t in trials:
        values = {k: dict(t.curves.get(k, [])) for k in keys}
        for s in sorted({s for k in keys for s in values[k]}):
            rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "iteration": s,
                         "images_seen": s * t.batch_size, **{short(k): values[k].get(s) for k in keys}})
    return write_rows(rows or [{"run": None}], path)


SECTIONS: list[Section] = [Header(), GroupTable(), SearchSection(), ConfirmSection(), Protocol(), Findings(),
                           Limits(), SeedRoundsSection(), Diverged(), CriticalBatchSection(), Tangent(), Figures(), Data()]


def write_report(plan, uri: str, parent_run_id: str, sections: Sequence[Section] | None = None) -> dict[str, Any]:
    """Write the report of the study `plan` from its MLflow runs: each of `sections` (SECTIONS)
    that applies, in order; returns report.md's path, every file written, the number of trials
    and the sections' records (`groups`: the group table's rows)."""
    from mlflow.tracking import MlflowClient
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = MlflowClient(uri).get_run(parent_run_id).info
    ctx = ReportContext(plan, load_trials(uri, parent_run_id), out, started_ms=info.start_time,
                        ended_ms=info.end_time if info.status != "RUNNING" else None)
    lines, files, records = [], [], {}
    for section in SECTIONS if sections is None else sections:
        if not section.applies(ctx):
            continue
        output = section.write(ctx)
        ctx.outputs.append((section, output))
        lines += output.lines
        files += output.files
        records.update(output.records)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return {"report": str(path), "files": [*files, str(path)], **records, "trials": len(ctx.trials)}
