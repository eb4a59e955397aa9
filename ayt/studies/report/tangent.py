"""The study report's tangent-diagnostics section (`ayt.eval.tangent`): tangent.png and tangent.csv.

tangent.png has one column per t-bin and a row each for the cosine of the loss's output
gradient with the pixel error (`cos`), the oscillation (`osc`: cosine with the previous
evaluation's directions) and the pixel error norm (`err`), against images seen; each seed
thin, the mean over seeds bold, styled per group like the FID figures. Panel titles give
the bin's t range, computed from the study's base config (a study that sweeps the schedule
has other edges per trial). tangent.csv holds every tangent metric of every evaluation.
Trials that logged no tangent metrics (diagnostics off, or runs from before them) add nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from ayt.eval.tangent import COS, ERR, OSC, PREFIX, bin_edges, metric_key
from ayt.method.schedule import ConsistencySchedule
from ayt.studies.report.plots import group_styles, pyplot, seeds_and_mean
from ayt.studies.report.rows import write_rows
from ayt.studies.report.section import ReportContext, Section, SectionOutput

ROWS = ((COS, "cos(−grad, error)"), (OSC, "oscillation (cos with previous eval)"), (ERR, "|error| (pixels)"))
_BIN = re.compile(r"_t(\d+)$")


class Tangent(Section):
    """tangent.png and tangent.csv, for studies whose trials logged tangent metrics; the figure
    is listed under the report's "## Figures"."""

    def applies(self, ctx: ReportContext) -> bool:
        return bool(_bins(ctx.trials))

    def write(self, ctx: ReportContext) -> SectionOutput:
        plt = pyplot()
        return SectionOutput(files=tangent_files(ctx.trials, ctx.out, ctx.plan, plt, group_styles(ctx.groups, plt)))


def tangent_keys(logged: Iterable[str]) -> list[str]:
    """The tangent metrics (per bin and overall) among a trial's histories."""
    return sorted(k for k in logged if k.startswith(PREFIX))


def _bins(trials) -> list[int]:
    found = {int(m.group(1)) for t in trials for k in t.curves if k.startswith(PREFIX) and (m := _BIN.search(k))}
    return sorted(found)


def _edges(plan, count: int) -> tuple[float, ...] | None:
    try:
        return bin_edges(ConsistencySchedule.from_config(plan.base.schedule, plan.base.edm), count)
    except Exception:           # a plan without a usable base config: titles without t ranges
        return None


def tangent_files(trials, out: Path, plan, plt, styles: dict[Any, dict[str, Any]]) -> list[str]:
    """tangent.png and tangent.csv under `out` (nothing when no trial logged tangent metrics)."""
    bins = _bins(trials)
    if not bins:
        return []
    rows = [(kind, label) for kind, label in ROWS
            if any(t.curves.get(metric_key(kind, b)) for t in trials for b in bins)]
    edges = _edges(plan, len(bins))
    groups = list(dict.fromkeys(t.group for t in trials))
    fig, panels = plt.subplots(len(rows), len(bins), figsize=(3.2 * len(bins), 2.6 * len(rows) + 0.6),
                               squeeze=False, sharex=True)
    for r, (kind, label) in enumerate(rows):
        for c, b in enumerate(bins):
            ax, key = panels[r][c], metric_key(kind, b)
            for group in groups:
                seeds_and_mean(ax, [t for t in trials if t.group == group], key, styles.get(group, {}), group.label,
                               markersize=3)
            if kind == ERR:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(plt.NullFormatter())
            if r == 0:
                span = f": t ∈ [{edges[b]:.3g}, {edges[b + 1]:.3g}]" if edges and b + 1 < len(edges) else ""
                ax.set_title(f"t-bin {b}{span}", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("images seen")
            ax.grid(alpha=0.3)
    handles, labels = panels[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.suptitle(f"{plan.name}: tangent diagnostics on the fixed probe set (thin: seeds, bold: mean)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    path = out / "tangent.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path), _write_csv(trials, out / "tangent.csv")]


def _write_csv(trials, path: Path) -> str:
    rows = []
    for t in trials:
        keys = tangent_keys(t.curves)
        values = {k: dict(t.curves[k]) for k in keys}
        for s in sorted({s for k in keys for s, _ in t.curves[k]}):
            rows.append({"run": t.name, **{f"axis.{k}": v for k, v in t.axes.items()}, "iteration": s,
                         "images_seen": s * t.batch_size,
                         **{k[len(PREFIX):]: values[k].get(s) for k in keys}})
    return write_rows(rows or [{"run": None}], path)
