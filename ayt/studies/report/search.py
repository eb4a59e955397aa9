"""The search section of the report: what a sampled study (`study.search` tpe,
random, any sampler but the grid) found, read as a search rather than as a table of groups.

  - the sampler, and in one line when the study never left its random start-up
    (`num_samples` <= the start-up trials of the sampler `sampler.optuna_sampler` builds);
  - the top `TOP_K` trials with their parameters, rounded to what their range resolves
    (`rounded`: 3 significant digits on a log range, 3 digits of the span on a linear one,
    integers as integers);
  - `search_history.png`: the final metric of each trial in the order the search proposed them
    (their runs' start), with the best so far;
  - parameter importance from the study's own Optuna storage (`plan.optuna_db`, the study
    OptunaSearch filled; rebuilt in memory from the trials when that file is missing) by
    PED-ANOVA and fANOVA (`optuna.importance`), each named, with a warning when there are fewer
    complete trials than it needs (`PED_ANOVA_MIN`, `FANOVA_MIN`);
  - `search_response.png`: the final metric against each parameter (log x on a log range, a
    binned-median trend; a categorical axis as box + strip), and `search_interaction.png`: the
    two most important parameters against each other, coloured by the metric.

Figures are drawn for a thousand trials: no per-trial legend, point size and alpha shrinking
with the number of trials. A search's groups are (nearly) its trials, so the group table is
left to groups.csv / trials.csv (`per_trial_table`, read by the report's GroupTable).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ayt.eval.metrics import MIN, best_index, direction, optuna_direction, sign, words
from ayt.eval.metrics import ranked as best_first
from ayt.metrics import short
from ayt.studies.protocols import decision as decisions
from ayt.studies.report.plots import pyplot, save_figure
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.engine.sampler import optuna_sampler, startup_trials
from ayt.studies.engine.space import Axis
from ayt.studies.engine.trials import Trial

TOP_K = 10
# A search with more groups than this leaves its group table to groups.csv and trials.csv:
# twice the top-k table, past which the rows are no longer read one by one.
GROUP_TABLE_MAX_ROWS = 2 * TOP_K
# PED-ANOVA compares the parameter densities of the top `target_quantile` (0.1 by default) of
# trials with all of them; Optuna's guidance is at least 5 trials in that top quantile:
# 5 / 0.1 = 50 complete trials.
PED_ANOVA_TOP = 5
# fANOVA's random forest needs points spread along each parameter to separate its main effect
# from the others' (a rule of thumb, not Optuna's): 10 complete trials per parameter, 20 at least.
FANOVA_PER_PARAM, FANOVA_MIN = 10, 20
# fANOVA's forest: Optuna's defaults grow 64 trees to depth 64 (a leaf per trial), and its
# marginalisation (pure Python, about quadratic in a tree's nodes) then takes minutes at 1,000
# trials. 32 trees of depth 6 (at most 64 cells each, so a leaf averages many trials' noisy
# FIDs instead of fitting one) rank the synthetic 1,000-trial study the same in about a
# second. Seeded: the same trials give the same numbers.
FANOVA_TREES, FANOVA_DEPTH, FANOVA_SEED = 32, 6, 0
LOG_Y_SPAN = 10.0                   # a metric spanning more than 10x is drawn on a log axis


def is_search(plan) -> bool:
    """A sampled study (tpe, random, any sampler but the grid)."""
    space = getattr(plan, "space", None)
    return space is not None and getattr(space, "search", "grid") != "grid"


def per_trial_table(ctx: ReportContext) -> bool:
    """Whether the group table would list (nearly) every trial of a search: left out of report.md."""
    return is_search(ctx.plan) and len(ctx.rows) > GROUP_TABLE_MAX_ROWS


def group_table_note(ctx: ReportContext) -> list[str]:
    """What report.md says instead of a search's per-trial group table."""
    return ["", f"The group table has {len(ctx.rows)} rows, one per sampled setting "
            f"({len(ctx.trials) / max(len(ctx.rows), 1):.1f} trials each): it is in `groups.csv`, every trial in "
            f"`trials.csv`; the search section lists the top {TOP_K}."]


# ---- the space as Optuna sees it ---------------------------------------------------------

def distribution(axis: Axis):
    """The Optuna distribution `axis.suggest` samples from."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    if axis.values is not None:
        return CategoricalDistribution(list(axis.values))
    if axis.integer:
        return IntDistribution(int(axis.low), int(axis.high), log=axis.log)
    return FloatDistribution(float(axis.low), float(axis.high), log=axis.log)


def value_of(axis: Axis, text: str) -> Any:
    """An axis value back from its MLflow param (a string); None when it is not one of the axis'."""
    if axis.values is not None:
        return next((v for v in axis.values if str(v) == str(text)), None)
    try:
        return int(round(float(text))) if axis.integer else float(text)
    except (TypeError, ValueError):
        return None


def rounded(axis: Axis, value: Any) -> str:
    """A value at the resolution its range gives: integers whole, a log range to 3 significant
    digits, a linear one to 3 digits of its span (0.05-0.5: 0.123; 1-8: 3.14)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if axis.values is not None:
        return str(value)
    if axis.integer:
        return str(int(round(float(value))))
    if axis.log:
        return f"{float(value):.3g}"
    decimals = max(0, 2 - math.floor(math.log10(float(axis.high) - float(axis.low))))
    return f"{float(value):.{decimals}f}"


def search_axes(plan) -> list[Axis]:
    """The sampled parameters (the seed, a repeat axis, is not one)."""
    return list(plan.space.axes)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[list[warnings.WarningMessage]]:
    """Optuna's INFO lines off for the duration (restored after: a study driver logs with it),
    and its warnings caught for the report."""
    import optuna
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        optuna.logging.set_verbosity(verbosity)


def optuna_study(plan, trials: Sequence[Trial], key: str):
    """(study, where it came from): the study's own Optuna storage (`plan.optuna_db`, the study
    named `plan.study_id`), or, when that is missing, one rebuilt in memory from the trials'
    axis values and final metric (failed trials as FAIL)."""
    import optuna
    db = Path(plan.optuna_db) if getattr(plan, "optuna_db", None) else None
    if db is not None and db.is_file():
        try:
            study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{db}")
            return study, f"the study's Optuna storage (`{db.name}`, study `{plan.study_id}`)"
        except KeyError:          # the file holds no study of that name
            pass
    axes = search_axes(plan)
    endpoint = decisions.of(plan.study).endpoint              # what the search ranked by
    dists = {a.param: distribution(a) for a in axes}
    study = optuna.create_study(direction=optuna_direction(key), study_name=getattr(plan, "study_id", None))
    frozen = []
    for t in trials:
        params = {a.param: value_of(a, t.axes.get(a.key)) for a in axes}
        if any(v is None for v in params.values()):
            continue
        value = t.score(key, endpoint)
        ok = t.status != "FAILED" and math.isfinite(value)
        frozen.append(optuna.trial.create_trial(
            params=params, distributions=dists, value=value if ok else None,
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL))
    study.add_trials(frozen)
    why = "missing" if db is None or not db.is_file() else "without the study"
    name = db.name if db else "optuna.db"
    return study, f"a study rebuilt from the MLflow trials (the Optuna storage `{name}` is {why})"


def evaluators() -> list[tuple[str, str, Any, str]]:
    """(record key, name, evaluator, what its number means) of each importance evaluator."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
    return [("ped_anova", "PED-ANOVA", PedAnovaImportanceEvaluator(),
             "`optuna.importance.PedAnovaImportanceEvaluator()` (its defaults): how much a parameter's values "
             "in the top 10% of trials differ from its values over all of them"),
            ("fanova", "fANOVA",
             FanovaImportanceEvaluator(n_trees=FANOVA_TREES, max_depth=FANOVA_DEPTH, seed=FANOVA_SEED),
             f"`optuna.importance.FanovaImportanceEvaluator(n_trees={FANOVA_TREES}, max_depth={FANOVA_DEPTH}, "
             f"seed={FANOVA_SEED})` (a random forest fitted to the metric): the share of the metric's variance "
             "each parameter explains alone")]


def needed_trials(name: str, params: int) -> int:
    """The complete trials an evaluator needs before its ranking is worth reading."""
    if name == "ped_anova":
        from optuna.importance import PedAnovaImportanceEvaluator
        return math.ceil(PED_ANOVA_TOP / PedAnovaImportanceEvaluator()._target_quantile)
    return max(FANOVA_MIN, FANOVA_PER_PARAM * params)


def importances(study, params: list[str]) -> dict[str, Any]:
    """Each evaluator's normalised importances (largest first) over `params`, or the error it
    raised; the warnings Optuna gave; the number of complete trials."""
    import optuna
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    present = [p for p in params if any(p in t.params for t in complete)]
    out: dict[str, Any] = {"complete_trials": len(complete), "params": present, "warnings": []}
    if len(present) < 2 or len(complete) < 2:
        return out
    for record, name, evaluator, _ in evaluators():
        with _quiet_optuna() as caught:
            try:
                out[record] = optuna.importance.get_param_importances(study, evaluator=evaluator, params=present)
            except Exception as err:  # noqa: BLE001 - one evaluator failing (sklearn missing) leaves the other
                out[record + "_error"] = f"{type(err).__name__}: {err}"
        out["warnings"] += sorted({f"{name}: {w.message}" for w in caught})
    return out


# ---- figures -----------------------------------------------------------------------------

def _marks(n: int) -> dict[str, float]:
    """Point size and alpha for n points: full at a few dozen, small and faint at a thousand."""
    scale = math.sqrt(max(n, 1) / 40)
    return {"s": float(np.clip(28 / scale, 6, 28)), "alpha": float(np.clip(0.85 / scale, 0.3, 0.85))}


def _legend(ax, **kwargs) -> None:
    """A legend of a few entries whose markers show at full opacity (the points may be faint)."""
    legend = ax.legend(**kwargs)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)


def _log_y(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return len(finite) > 1 and max(finite) / min(finite) > LOG_Y_SPAN


def binned_median(xs: np.ndarray, ys: np.ndarray, log: bool, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A smoothed trend: the median of y in equal-width bins of x (of log x on a log range), at
    each bin's median x; bins with fewer than 3 points are left out."""
    if len(xs) < 6:
        return np.array([]), np.array([])
    bins = bins or int(np.clip(len(xs) // 15, 3, 20))
    u = np.log(xs) if log else xs
    edges = np.linspace(u.min(), u.max(), bins + 1)
    which = np.clip(np.digitize(u, edges[1:-1]), 0, bins - 1)
    mx, my = [], []
    for b in range(bins):
        inside = which == b
        if inside.sum() >= 3:
            mx.append(np.median(xs[inside]))
            my.append(np.median(ys[inside]))
    return np.array(mx), np.array(my)


def history_figure(finals: list[float], key: str, path: Path, title: str, startup: int | None,
                   ep: str = "final") -> str:
    """Final metric per trial in proposal order (dots) and the best so far (a line)."""
    plt = pyplot()
    n = len(finals)
    x = np.arange(1, n + 1)
    y = np.array(finals, dtype=float)
    ok = np.isfinite(y)
    best = (np.fmin.accumulate(np.where(ok, y, np.inf)) if direction(key) == MIN
            else np.fmax.accumulate(np.where(ok, y, -np.inf)))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.scatter(x[ok], y[ok], color="tab:blue", linewidths=0, label=f"trial ({ep})", **_marks(n))
    shown = np.isfinite(best)
    ax.step(x[shown], best[shown], where="post", color="tab:red", linewidth=1.8, label="best so far")
    if startup and startup < n:
        ax.axvline(startup + 0.5, color="grey", linestyle=":", linewidth=1, label=f"end of {startup} random start-up")
    if _log_y(y[ok]):
        ax.set_yscale("log")
    ax.set_xlabel("trial (in the order the search proposed them)")
    ax.set_ylabel(f"{ep} {short(key)}")
    failed = int((~ok).sum())
    ax.set_title(title + (f" ({failed} failed, not shown)" if failed else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)   # off the points
    return save_figure(fig, path)


def _categorical_positions(axis: Axis, values: Sequence[Any], rng) -> tuple[np.ndarray, list[str]]:
    labels = [str(v) for v in axis.values]
    index = np.array([labels.index(str(v)) for v in values], dtype=float)
    return index + rng.uniform(-0.18, 0.18, len(index)), labels


def response_figure(axes: list[Axis], points: list[dict[str, Any]], finals: np.ndarray, key: str, path: Path,
                    title: str, stopped: np.ndarray | None = None, ep: str = "final") -> str:
    """One panel per parameter: final metric against its value (log x on a log range) with a
    binned-median trend; a categorical parameter as a box per value with its trials jittered.
    Trials ASHA stopped early (`stopped`) were scored at a lower fidelity: drawn as grey rings,
    left out of the trend, the boxes and the best."""
    plt = pyplot()
    rng = np.random.default_rng(0)
    stopped = np.zeros(len(finals), dtype=bool) if stopped is None else np.asarray(stopped, dtype=bool)
    full = ~stopped
    cols = min(3, len(axes))
    rows = math.ceil(len(axes) / cols)
    fig, panels = plt.subplots(rows, cols, figsize=(max(4.3 * cols, 7.0), 3.5 * rows + 0.4), squeeze=False,
                               sharey=True)
    marks = _marks(len(finals))
    scored = np.where(full, finals, np.nan)
    best = best_index(list(scored), key)
    log_y = _log_y(finals)
    for i, axis in enumerate(axes):
        ax = panels[i // cols][i % cols]
        values = [p[axis.param] for p in points]
        if axis.values is not None:
            xs, labels = _categorical_positions(axis, values, rng)
            groups = [finals[[str(v) == label and f for v, f in zip(values, full)]] for label in labels]
            ax.boxplot([g if len(g) else [np.nan] for g in groups], positions=range(len(labels)), widths=0.5,
                       showfliers=False, medianprops={"color": "tab:red", "linewidth": 1.8})
            ax.scatter(xs[full], finals[full], color="tab:blue", linewidths=0, **marks)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0, fontsize=8)
        else:
            xs = np.array(values, dtype=float)
            ax.scatter(xs[full], finals[full], color="tab:blue", linewidths=0, label="trial (whole budget)", **marks)
            if axis.log:
                ax.set_xscale("log")
            tx, ty = binned_median(xs[full], finals[full], axis.log)
            if len(tx):
                ax.plot(tx, ty, color="tab:red", linewidth=1.8, label="binned median")
        if stopped.any():
            ax.scatter(xs[stopped], finals[stopped], facecolors="none", edgecolors="grey", linewidths=0.8,
                       s=marks["s"], alpha=max(marks["alpha"], 0.5), label="stopped early (lower fidelity)")
        if best is not None:
            ax.scatter([xs[best]], [finals[best]], marker="*", s=140,
                       color="gold", edgecolors="black", linewidths=0.6, zorder=5, label="best")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(axis.key + (" (log)" if axis.log else ""))
        if i % cols == 0:
            ax.set_ylabel(f"{ep} {short(key)}")
        ax.grid(alpha=0.3, which="both")
        if i == 0:
            _legend(ax, fontsize=7, loc="best")
    for j in range(len(axes), rows * cols):
        panels[j // cols][j % cols].set_visible(False)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def interaction_figure(pair: tuple[Axis, Axis], points: list[dict[str, Any]], finals: np.ndarray, key: str,
                       path: Path, title: str, ep: str = "final") -> str:
    """The two parameters against each other, each trial a dot coloured by its final metric
    (the best drawn last, on top; colours clipped to the 2nd-98th percentile)."""
    from matplotlib.colors import LogNorm, Normalize
    plt = pyplot()
    rng = np.random.default_rng(1)
    ok = np.isfinite(finals)
    order = np.argsort(-sign(key) * np.where(ok, finals, sign(key) * -np.inf))   # worst first, best last
    order = [i for i in order if ok[i]]
    fig, ax = plt.subplots(figsize=(6.4, 5))
    coords = []
    for axis, set_scale, set_ticks in ((pair[0], ax.set_xscale, ax.set_xticks),
                                       (pair[1], ax.set_yscale, ax.set_yticks)):
        values = [points[i][axis.param] for i in order]
        if axis.values is not None:
            c, labels = _categorical_positions(axis, values, rng)
            set_ticks(range(len(labels)), labels, fontsize=8)
        else:
            c = np.array(values, dtype=float)
            if axis.log:
                set_scale("log")
        coords.append(c)
    y = finals[order]
    lo, hi = (np.percentile(y, [2, 98]) if len(y) else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    norm = LogNorm(lo, hi) if lo > 0 and hi / lo > LOG_Y_SPAN else Normalize(lo, hi)
    marks = _marks(len(y))
    dots = ax.scatter(coords[0], coords[1], c=y, cmap="viridis_r" if sign(key) > 0 else "viridis", norm=norm,
                      linewidths=0,
                      s=max(marks["s"], 10), alpha=max(marks["alpha"], 0.6))
    if len(y):
        ax.scatter([coords[0][-1]], [coords[1][-1]], marker="*", s=160, color="red", edgecolors="black",
                   linewidths=0.6, zorder=5, label="best")
        ax.legend(fontsize=8, loc="best")
    fig.colorbar(dots, ax=ax, label=f"{ep} {short(key)} ({words(key)[0]} is better)")
    ax.set_xlabel(pair[0].key + (" (log)" if pair[0].log else ""))
    ax.set_ylabel(pair[1].key + (" (log)" if pair[1].log else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


# ---- the section -------------------------------------------------------------------------

def proposal_order(trials: Sequence[Trial]) -> list[Trial]:
    """The trials in the order the search proposed them: their runs' start (then their name)."""
    return sorted(trials, key=lambda t: (t.started_ms is None, t.started_ms or 0, t.name))


class SearchSection(Section):
    """A sampled study as a search: sampler, top trials, best so far, importance, responses."""

    def applies(self, ctx: ReportContext) -> bool:
        return is_search(ctx.plan) and bool(search_axes(ctx.plan)) and bool(ctx.trials)

    def write(self, ctx: ReportContext) -> SectionOutput:
        plan, key, out = ctx.plan, ctx.key, ctx.out
        axes = search_axes(plan)
        order = proposal_order(ctx.trials)
        endpoint = ctx.decision.endpoint     # every trial scored at the study's endpoint, as the search ranked it
        ep = endpoint.label
        scored = [t.score(key, endpoint) if t.status != "FAILED" else math.nan for t in order]
        lines = ["", f"## Search ({plan.space.search}, {len(order)} trials)", ""]
        records: dict[str, Any] = {"search": plan.space.search, "trials": len(order)}
        lines += self._sampler_lines(plan, records)

        lines += self._top_lines(axes, order, scored, key, records, ep)
        files = [history_figure(scored, key, out / "search_history.png",
                                f"{plan.name}: {ep} {short(key)} per trial, best so far", records.get("startup"), ep)]
        lines += ["", "![search_history.png](search_history.png)"]

        ranked = self._importance_lines(plan, order, key, axes, lines, records)

        points = [{a.param: value_of(a, t.axes.get(a.key)) for a in axes} for t in order]
        keep = [i for i, p in enumerate(points) if all(v is not None for v in p.values()) and math.isfinite(scored[i])]
        points, finals = [points[i] for i in keep], np.array([scored[i] for i in keep], dtype=float)
        stopped = np.array([order[i].stopped_early for i in keep], dtype=bool)
        if len(keep):
            early = f", {int(stopped.sum())} stopped early: grey rings" if stopped.any() else ""
            files.append(response_figure(axes, points, finals, key, out / "search_response.png",
                                         f"{plan.name}: {ep} {short(key)} against each parameter\n"
                                         f"({len(keep)} trials{early}; red: binned median / box median of "
                                         "whole-budget trials)", stopped, ep))
            lines += ["", "![search_response.png](search_response.png)"]
            if len(axes) >= 2:
                by_param = {a.param: a for a in axes}
                pair = tuple(by_param[p] for p in (ranked + [a.param for a in axes if a.param not in ranked])[:2])
                files.append(interaction_figure(pair, points, finals, key, out / "search_interaction.png",
                                                f"{plan.name}: {pair[0].key} × {pair[1].key} "
                                                f"({'the two most important' if len(ranked) >= 2 else 'the first two'} "
                                                "parameters)", ep))
                lines += ["", "![search_interaction.png](search_interaction.png)"]
        return SectionOutput(lines, files, {"search": records})

    @staticmethod
    def _sampler_lines(plan, records: dict[str, Any]) -> list[str]:
        search, samples = plan.space.search, plan.space.num_samples
        sampler = optuna_sampler(plan)
        startup = startup_trials(plan)
        records["sampler"], records["startup"] = type(sampler).__name__, startup
        records["random_search"] = search == "random" or (startup is not None and samples is not None
                                                          and samples <= startup)
        lines = [f"- sampler: Optuna `{type(sampler).__name__}` (seed {plan.study.get('sampler_seed', 0)}"
                 + (f"; its first {startup} trials drawn at random, its start-up" if startup else "")
                 + f"); {samples} trials asked for"]
        if startup is not None and samples is not None and samples <= startup:
            lines.append(f"- **This is a random search**: num_samples={samples} does not exceed the sampler's "
                         f"{startup} random start-up trials, so {search.upper()} never proposed a trial.")
        return lines

    @staticmethod
    def _top_lines(axes: list[Axis], order: list[Trial], scored: list[float], key: str,
                   records: dict[str, Any], ep: str = "final") -> list[str]:
        ranked = [i for i in best_first(range(len(scored)), scored.__getitem__, key) if math.isfinite(scored[i])][:TOP_K]
        lines = ["", f"Top {len(ranked)} of {sum(map(math.isfinite, scored))} trials with a {ep} {short(key)} "
                 "(parameters at the resolution of their range; # is the trial's place in the search):", "",
                 f"| rank | # | trial | {ep} " + short(key) + " | " + " | ".join(a.key for a in axes) + " |",
                 "|" + "---|" * (4 + len(axes))]
        top = []
        for rank, i in enumerate(ranked, 1):
            t = order[i]
            values = {a.key: value_of(a, t.axes.get(a.key)) for a in axes}
            note = " (stopped early)" if t.stopped_early else ""
            lines.append(f"| {rank} | {i + 1} | `{t.name}`{note} | {scored[i]:.2f} | "
                         + " | ".join(rounded(a, values[a.key]) for a in axes) + " |")
            top.append({"trial": t.name, "index": i + 1, "final": scored[i], **values})
        records["top"] = top
        return lines

    @staticmethod
    def _importance_lines(plan, order: list[Trial], key: str, axes: list[Axis], lines: list[str],
                          records: dict[str, Any]) -> list[str]:
        """Appends the importance part; returns the parameters ranked (most important first)."""
        lines += ["", "### Parameter importance", ""]
        if len(axes) == 1:
            lines.append(f"One parameter (`{axes[0].key}`): its importance is trivially 1.0.")
            records["importance"] = {axes[0].param: 1.0}
            return [axes[0].param]
        with _quiet_optuna():
            study, source = optuna_study(plan, order, key)
        found = importances(study, [a.param for a in axes])
        records["importance"] = found
        records["importance_source"] = source
        n = found["complete_trials"]
        lines.append(f"From {source}: {n} complete trials.")
        early = sum(t.stopped_early for t in order)
        if early:
            lines.append(f"- {early} of them were stopped early by ASHA: Optuna holds their last value, at a lower "
                         "fidelity, so this ranking mixes what does well early with what does well at the end.")
        if n < 2:
            lines.append(f"- Too few complete trials ({n}) for any importance.")
            return []
        names = {a.param: a.key for a in axes}
        done = [(record, name, text) for record, name, _, text in evaluators() if record in found]
        for record, name, _, text in evaluators():
            lines.append(f"- {name}: {text}." if record in found else
                         f"- {name}: not computed ({found.get(record + '_error', 'no result')}).")
            need = needed_trials(record, len(found["params"]))
            if record in found and n < need:
                lines.append(f"- **Warning**: {n} complete trials are too few for {name} (it needs about {need}: "
                             + ("5 in its top 10%" if record == "ped_anova" else
                                f"{FANOVA_PER_PARAM} per parameter, {FANOVA_MIN} at least")
                             + "); read its ranking as a hint.")
        for w in found["warnings"]:
            lines.append(f"- Optuna warned: {w}")
        if not done:
            return []
        first = done[0][0]
        params = list(found[first])
        lines += ["", "| parameter | " + " | ".join(name for _, name, _ in done) + " |", "|" + "---|" * (1 + len(done))]
        lines += [f"| `{names.get(p, p)}` | " + " | ".join(f"{found[r].get(p, math.nan):.3f}" for r, _, _ in done)
                  + " |" for p in params]
        return params
