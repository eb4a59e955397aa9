"""How the report draws histories: one group's trials as thin seed lines with their mean bold
(`seeds_and_mean`, for the FID, tangent and noise-scale figures alike), styled per group so
related curves read as families (`group_styles`), and one figure of a history per group
(`curve_figure`). x is images seen everywhere: the axis that compares batch sizes fairly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ayt.eval.metrics import sign, words
from ayt.studies.engine.group import Group, is_number


def pyplot():
    """matplotlib.pyplot on the Agg backend (reports are written without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> str:
    """Lay out, write and close a report figure; its path as text (what sections list)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def group_styles(groups: list[Group], plt) -> dict[Group, dict[str, Any]]:
    """Colour by the first categorical axis (e.g. the loss), line style and marker by the
    first numeric one (e.g. the batch size), so related curves read as families."""
    if not groups:
        return {}
    keys = list(groups[0].keys)
    numeric = [k for k in keys if all(is_number(g.get(k)) for g in groups)]
    categorical = [k for k in keys if k not in numeric]
    colour_key = categorical[0] if categorical else (numeric[0] if len(numeric) == 1 else None)
    style_key = next((k for k in numeric if k != colour_key), None)
    colour_values = list(dict.fromkeys(g.get(colour_key) for g in groups)) if colour_key else []
    style_values = sorted({g.get(style_key) for g in groups}, key=float) if style_key else []
    palette = plt.get_cmap("tab10")
    dashes, markers = ["-", "--", "-.", ":"], ["o", "s", "^", "D", "v", "P"]
    styles = {}
    for i, g in enumerate(groups):
        c = colour_values.index(g.get(colour_key)) if colour_key else i
        k = style_values.index(g.get(style_key)) if style_key else 0
        styles[g] = {"color": palette(c % 10), "linestyle": dashes[k % len(dashes)],
                     "marker": markers[k % len(markers)]}
    return styles


def seeds_and_mean(ax, trials: Sequence, key: str, style: dict[str, Any] | None = None, label: str | None = None,
                   seeds: bool = True, linewidth: float = 2, markersize: float = 4) -> None:
    """One group's history `key` against images seen: each trial thin (`seeds`), the mean over
    them bold at the evaluations they all have (none: no mean line), labelled `label`. Trials
    without the history are left out."""
    trials = [t for t in trials if t.curves.get(key)]
    if not trials:
        return
    style = style or {}
    if seeds:
        for t in trials:
            ax.plot([s * t.batch_size for s, _ in t.curves[key]], [v for _, v in t.curves[key]],
                    color=style.get("color"), linestyle=style.get("linestyle"), alpha=0.3, linewidth=0.8)
    curve = mean_curve(trials, key)
    if curve:
        ax.plot([s * trials[0].batch_size for s, _ in curve], [m for _, m in curve], linewidth=linewidth,
                marker=style.get("marker"), markersize=markersize, label=label, color=style.get("color"),
                linestyle=style.get("linestyle"))


def mean_curve(trials: Sequence, key: str) -> list[tuple[int, float]]:
    """The mean of history `key` over the trials that have it, at the evaluations they all
    have: [(iteration, mean)] (empty when none or no shared evaluation)."""
    curves = [dict(t.curves[key]) for t in trials if t.curves.get(key)]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, float(np.mean([c[s] for c in curves]))) for s in steps]


LEGEND_MAX = 12     # groups a curve figure tells apart by a legend; past that, one line per trial by colour


def trial_curves(ax, trials: Sequence, key: str) -> None:
    """Every trial's history `key` against images seen as one thin line, coloured by its last
    value (a colour bar, no legend; the best drawn last, on top: lowest, or highest for a
    higher-is-better metric): how a search's thousand trials stay readable (and quick to draw)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    curves = [np.array([(s * t.batch_size, v) for s, v in t.curves[key]], dtype=float)
              for t in trials if t.curves.get(key)]
    if not curves:
        return
    s = sign(key)
    curves.sort(key=lambda c: -s * c[-1, 1])
    last = np.array([c[-1, 1] for c in curves])
    lo, hi = np.percentile(last, [2, 98])
    lines = LineCollection(curves, array=last, cmap="viridis_r" if s > 0 else "viridis",
                           norm=Normalize(lo, hi if hi > lo else lo + 1),
                           linewidths=0.7, alpha=float(np.clip(6 / np.sqrt(len(curves)), 0.15, 0.8)))
    ax.add_collection(lines)
    ax.autoscale_view()
    ax.figure.colorbar(lines, ax=ax, label=f"last value ({words(key)[0]} is better)")


def curve_figure(trials: Sequence, key: str, path: Path, title: str, ylabel: str, log_y: bool = True) -> str:
    """`key` against images seen, one seeds-and-mean family per group (`group_styles`); past
    LEGEND_MAX groups (a search), one line per trial coloured by its last value, no legend."""
    plt = pyplot()
    groups = list(dict.fromkeys(t.group for t in trials))
    styles = group_styles(groups, plt)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    many = len(groups) > LEGEND_MAX
    if many:            # a search: its groups are its trials; the title's "(thin: seeds, ...)" no longer holds
        trial_curves(ax, trials, key)
        title = f"{title.split(' (')[0]} ({len(trials)} trials, one line each)"
    for group in [] if many else groups:
        seeds_and_mean(ax, [t for t in trials if t.group == group], key, styles[group], group.label)
    ax.set_xlabel("images seen")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if not many:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
