"""The critical batch size of a batch-size sweep (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training"): steps S and images E to a target FID follow
S(B) = S_min (1 + B_noise/B) and E(B) = B·S(B) = E_min (1 + B/B_noise), E_min = S_min·B_noise.
Both are one linear least-squares fit of S on 1/B (intercept S_min, slope S_min·B_noise);
B_noise gets a bootstrap CI over seeds. Beside it: the measured noise scale B_simple
(`eval/noise_scale`), and, when `lr_scaling` is swept, which rule keeps images-to-target
flattest across batch sizes.

Target FID (`study.critical_batch.target`): the worst group's best seed-mean FID, so every
group's mean curve reaches it, taken over
  shared      every group: B_noise compares across losses at the same image quality (B_noise
              grows as training progresses, so per-loss targets compare losses at different
              stages). Only useful when the series reach similar FIDs: a much faster series
              reaches a slow one's target at its first evaluation at every batch size, and
              its steps to the target are not resolved;
  per_series  the groups of each series (its batch sizes): each series is fitted at the
              loosest FID all its batch sizes reach, so no series is fitted on unresolved
              points, and B_noise of two series describe different stages of training.
Steps to the target are interpolated linearly between evaluations; a series whose every
trial was already there at its first evaluation is flagged as not resolved.

Censored trials. Neither target rule guarantees that every seed reaches it: the
target is a seed mean, so a slow seed of the worst batch size can end above it (in
critical_batch_sweep, 2 of 3 MFD b8 seeds). Dropping such a trial keeps only the fast seeds
of that batch size and biases its steps low (B_noise low when it is the smallest batch size,
high when the largest). Instead it enters the fit right-censored: its steps to the target
are only known to exceed its last evaluated iteration L (so is a trial that failed or was
stopped early: a weak bound, but a true one). The fit is censored least squares with a one-sided loss: a censored point costs
max(0, L − fit)², nothing while the fitted line is at or above its bound and the squared
shortfall below it. That is the same as giving each censored point a free value z ≥ L
(min over z ≥ L of (z − fit)² is that cost), so the fit is one bounded least-squares
problem, solved exactly by scipy's `lsq_linear` (BVLS); it is the fixed point of the
imputation "fit, set each censored y to max(L, fitted), refit". Unlike a Tobit model it
needs no noise distribution, and it never imputes beyond what the line asks for, so it is
conservative: the censored points only push the fit up to their bounds. A trial with no
evaluation at all has no bound and stays out of the fit (listed as never evaluated). The
bootstrap refits the same way.

The bootstrap resamples seeds: n seeds have C(2n−1, n) distinct resamples (3 seeds: 10,
4: 35, 5: 126), so below BOOTSTRAP_DISTINCT of them its bracket is the spread of a few refits
(at 3 seeds about their range), not a 95% interval, and the section says so. A B_noise or CI
end outside the batch sizes the fit saw is marked as an extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import lsq_linear

from ayt.eval.metrics import at_least_as_good
from ayt.eval.metrics import best as best_of
from ayt.eval.metrics import sign
from ayt.metrics import short
from ayt.studies.engine.group import Group
from ayt.studies.report.plots import pyplot, seeds_and_mean
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.engine.schema import TARGET_SCOPES, CriticalBatch  # noqa: F401  (declared once, in the schema)
from ayt.studies.report.stats import mean_ci, paired
from ayt.training.noise_scale import NOISE_SCALE

BATCH = "batch_size"
LR_RULE = "lr_scaling"
MIN_SEEDS, MIN_BATCHES = 2, 3
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_DISTINCT = 100   # fewer distinct resamples (n <= 4 seeds) and the percentiles are a few refits' spread


@dataclass(frozen=True)
class Point:
    """One trial's distance to the target: steps (interpolated iteration) and images; for a
    censored trial (never reached it) a lower bound, its last evaluated iteration."""

    series: Group        # the trial's group without the batch size, e.g. loss=mfd
    batch: int
    seed: str
    steps: float
    censored: bool = False

    @property
    def images(self) -> float:
        return self.steps * self.batch


@dataclass(frozen=True)
class NoiseFit:
    s_min: float
    b_noise: float       # nan where the fit has S_min <= 0 (no minimum number of steps)
    ci: tuple[float, float] = (math.nan, math.nan)
    valid_fraction: float = math.nan     # bootstrap refits with S_min > 0
    seeds: int = 0                       # the bootstrap's unit
    censored: int = 0                    # points in the fit known only as a lower bound
    tested: tuple[int, int] = (0, 0)     # smallest and largest batch size in the fit

    @property
    def e_min(self) -> float:
        return self.s_min * self.b_noise

    @property
    def distinct_resamples(self) -> int:
        """Distinct multisets of n seeds drawn with replacement: C(2n−1, n)."""
        return math.comb(2 * self.seeds - 1, self.seeds) if self.seeds else 0

    def extrapolation(self) -> str | None:
        """Where B_noise or its CI ends lie outside the batch sizes the fit saw (None: inside)."""
        low, high = self.tested

        def side(value: float) -> str | None:
            if not math.isfinite(value) or low <= value <= high:
                return None
            return f"below the smallest batch tested, {low}" if value < low else f"above the largest batch tested, {high}"
        estimate = side(self.b_noise)
        said = [f"B_noise {estimate}"] if estimate else []
        said += [f"CI {end} end {where}" for end, value in zip(("low", "high"), self.ci)
                 if (where := side(value)) and where != estimate]
        return "; ".join(said) + ": an extrapolation" if said else None

    def steps(self, batch: np.ndarray) -> np.ndarray:
        return self.s_min * (1 + self.b_noise / batch)


def crossing(curve: Sequence[tuple[int, float]], target: float, key: str = "fid") -> float | None:
    """First iteration at which the curve of metric `key` reaches `target` (at or below it, or
    above for a higher-is-better metric), linear between evaluations (the first evaluation
    itself if it is already there; None if never)."""
    previous = None
    for step, value in curve:
        if at_least_as_good(value, target, key):
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def _censored_lstsq(x: np.ndarray, y: np.ndarray, censored: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y = a + c x where a censored y is a lower bound (module
    docstring): each censored row gets a free value z >= y, one bounded problem for BVLS.
    (nan, nan) when the uncensored rows do not span two batch sizes."""
    keep = weight > 0
    x, y, censored, root = x[keep], y[keep], censored[keep], np.sqrt(weight[keep])
    if len(np.unique(x[~censored])) < 2:
        return math.nan, math.nan
    k = int(censored.sum())
    design = np.zeros((len(x), 2 + k))
    design[:, 0], design[:, 1] = root, root * x
    design[np.flatnonzero(censored), 2 + np.arange(k)] = -root[censored]
    lower = np.concatenate([[-np.inf, -np.inf], y[censored]])
    solution = lsq_linear(design, np.where(censored, 0.0, root * y), bounds=(lower, np.inf), method="bvls")
    return float(solution.x[0]), float(solution.x[1])


def fit(points: Sequence[Point], bootstrap: int = BOOTSTRAP, rng_seed: int = BOOTSTRAP_SEED) -> NoiseFit:
    """S_min and B_noise of S(B) = S_min (1 + B_noise/B), censored points as lower bounds; the
    percentile CI of B_noise from resampling seeds with replacement (all of a drawn seed's
    points, with multiplicity), each distinct resample refitted once."""
    x = np.array([1.0 / p.batch for p in points])
    y = np.array([p.steps for p in points])
    censored = np.array([p.censored for p in points])
    a, c = _censored_lstsq(x, y, censored, np.ones(len(points)))
    b_noise = c / a if a > 0 else math.nan
    seeds = sorted({p.seed for p in points})
    member = np.array([[p.seed == s for s in seeds] for p in points], dtype=float)    # point x seed
    rng = np.random.default_rng(rng_seed)
    counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=bootstrap)
    distinct, drawn = np.unique(counts, axis=0, return_inverse=True)
    refits = np.array([_censored_lstsq(x, y, censored, member @ row) for row in distinct]).reshape(-1, 2)
    a_b, c_b = refits[drawn.ravel()].T
    ok = np.isfinite(a_b) & np.isfinite(c_b) & (a_b > 0)
    ci = tuple(float(q) for q in np.percentile(c_b[ok] / a_b[ok], [2.5, 97.5])) if ok.any() else (math.nan, math.nan)
    batches = [p.batch for p in points]
    return NoiseFit(a, b_noise, ci, float(ok.mean()), len(seeds), int(censored.sum()), (min(batches), max(batches)))


def target_scope(study) -> str:
    """`study.critical_batch.target` (the schema's default when a bare study yaml leaves it unset)."""
    return str((study.get("critical_batch") or {}).get("target", CriticalBatch.target))


@dataclass
class Measurement:
    """Everything the section shows, computed from the trials."""

    target: float | None                 # the shared target (the loosest per-series one when per_series)
    scope: str = "shared"
    targets: dict[Group, float] = field(default_factory=dict)           # series -> its target
    unresolved: list[Group] = field(default_factory=list)              # series reached at the first evaluation only
    points: dict[Group, list[Point]] = field(default_factory=dict)      # series -> reached points
    missed: dict[Group, list[tuple[int, str]]] = field(default_factory=dict)   # series -> (batch, seed) never reached
    censored: dict[Group, list[Point]] = field(default_factory=dict)    # series -> missed with an evaluation: in the fit
    fits: dict[Group, NoiseFit] = field(default_factory=dict)


def worst_of(values, key: str) -> float:
    """The worst of finite `values` in the metric's direction (the loosest target)."""
    return float(max(values, key=lambda v: sign(key) * v))


def series_of(trial) -> Group:
    """The trial's series: its group without the batch size."""
    return trial.group.without(BATCH)


def shared_target(trials, key: str) -> float | None:
    """The worst group's best seed-mean FID (at evaluations every seed of the group has; the
    mean of the seeds' best FIDs where they share none); best and worst in the metric's direction."""
    best = []
    for group in {t.group for t in trials}:
        curves = [dict(t.curves.get(key, [])) for t in trials if t.group == group]
        curves = [c for c in curves if c]
        steps = set.intersection(*(set(c) for c in curves)) if curves else set()
        if steps:
            best.append(best_of((float(np.mean([c[s] for c in curves])) for s in steps), key))
        elif curves:
            best.append(float(np.mean([best_of(c.values(), key) for c in curves])))
    return worst_of(best, key) if best else None


def measure(trials, key: str, bootstrap: int = BOOTSTRAP, scope: str = "shared") -> Measurement:
    by_series: dict[Group, list] = {}
    for t in trials:
        by_series.setdefault(series_of(t), []).append(t)
    if scope == "per_series":
        targets = {s: shared_target(ts, key) for s, ts in by_series.items()}
    else:
        shared = shared_target(trials, key)
        targets = {s: shared for s in by_series}
    known = [v for v in targets.values() if v is not None]
    out = Measurement(worst_of(known, key) if known else None, scope, {s: v for s, v in targets.items() if v is not None})
    if out.target is None:
        return out
    for series, members in sorted(by_series.items()):
        target = targets.get(series)
        if target is None:
            continue
        first_only = True
        for t in members:
            curve = t.curves.get(key, [])
            steps = crossing(curve, target, key)
            if steps is None:
                out.missed.setdefault(series, []).append((t.batch_size, t.seed))
                if curve:
                    out.censored.setdefault(series, []).append(
                        Point(series, t.batch_size, t.seed, float(curve[-1][0]), censored=True))
                first_only = False
            else:
                out.points.setdefault(series, []).append(Point(series, t.batch_size, t.seed, steps))
                first_only &= bool(curve) and steps == float(curve[0][0])
        if first_only and series in out.points:
            out.unresolved.append(series)
    for series, points in out.points.items():
        if len({p.batch for p in points}) >= 2:
            out.fits[series] = fit(points + out.censored.get(series, []), bootstrap)
    return out


def requirements(trials) -> str | None:
    """What the sweep lacks for a critical batch size (None: nothing)."""
    seeds = len({t.seed for t in trials})
    batches = len({t.batch_size for t in trials})
    missing = []
    if seeds < MIN_SEEDS:
        missing.append(f"{seeds} seed (needs >= {MIN_SEEDS}: `study.seeds=[0,1,2]`)")
    if batches < MIN_BATCHES:
        missing.append(f"{batches} batch sizes (needs >= {MIN_BATCHES})")
    return "; ".join(missing) or None


def lr_rule_spread(measurement: Measurement) -> list[dict]:
    """Per series with an `lr_scaling` value: images to target per batch size (mean over
    seeds that reached it) and its coefficient of variation across batch sizes (std/mean,
    lower = flatter); series with a trial that missed the target rank after the others."""
    rows = []
    for series in sorted(set(measurement.points) | set(measurement.missed)):
        if series.get(LR_RULE) is None:
            continue
        by_batch: dict[int, list[float]] = {}
        for p in measurement.points.get(series, []):
            by_batch.setdefault(p.batch, []).append(p.images)
        missed_batches = {b for b, _ in measurement.missed.get(series, [])}
        means = np.array([np.mean(v) for _, v in sorted(by_batch.items())])
        cv = float(means.std() / means.mean()) if len(means) >= 2 else math.inf
        rows.append({"series": series, "images": {b: float(np.mean(v)) for b, v in sorted(by_batch.items())},
                     "cv": cv, "max_over_min": float(means.max() / means.min()) if len(means) else math.nan,
                     "missed_batches": sorted(missed_batches)})
    return sorted(rows, key=lambda r: (bool(r["missed_batches"]), r["cv"]))


class CriticalBatchSection(Section):
    """The report's "Critical batch size" section, for sweeps of the batch size (`CriticalBatch`
    is the schema of `study.critical_batch`)."""

    def applies(self, ctx: ReportContext) -> bool:
        return sweeps_batch(ctx.trials)

    def write(self, ctx: ReportContext) -> SectionOutput:
        return section(ctx.trials, ctx.key, ctx.out, ctx.plan.name, scope=target_scope(ctx.plan.study))


def sweeps_batch(trials) -> bool:
    return bool(trials) and all(BATCH in t.axes for t in trials)


def section(trials, key: str, out: Path, title: str = "", bootstrap: int = BOOTSTRAP,
            scope: str = "shared") -> SectionOutput:
    """The "Critical batch size" section's text and figure (empty when batch size is not swept)."""
    if not sweeps_batch(trials):
        return SectionOutput([])
    head = ["", "## Critical batch size", ""]
    lacking = requirements(trials)
    if lacking:
        return SectionOutput(head + [f"- Not computed: the sweep has {lacking}."])
    m = measure(trials, key, bootstrap, scope)
    if m.target is None:
        return SectionOutput(head + ["- Not computed: no trial has an FID curve."])
    if scope == "per_series":
        which = (f"Target {short(key)} per series (`study.critical_batch.target=per_series`): the series' worst batch "
                 "size's best seed-mean FID, the loosest FID every batch size of it reaches, so no series is fitted "
                 "on points it passed before its first evaluation; B_noise of two series then describe different "
                 "stages of training (B_noise grows as the target tightens)")
    else:
        which = (f"Target {short(key)} {m.target:.2f}: the worst group's best seed-mean FID, shared by every "
                 "series so B_noise compares at the same image quality")
    lines = head + [which + "; steps to it interpolated between "
                    "evaluations. Fit S(B) = S_min (1 + B_noise/B), E(B) = E_min (1 + B/B_noise) by least squares "
                    "of S on 1/B, a trial that never reached the target in it as censored (its steps known only to "
                    "exceed its last evaluated iteration: the fit pays for falling below that bound, not for lying "
                    f"above it); 95% CI of B_noise: percentile bootstrap over seeds ({bootstrap} resamples; with few "
                    "seeds it is too narrow: 76% coverage at 3 seeds, 88% at 5 on synthetic sweeps with 5% noise)."
                    + _resamples_sentence(m.fits.values()), "",
                    "| series | target FID | B_noise [bootstrap CI] | S_min (steps) | E_min (images) "
                    "| B_simple (last eval, mean) | B_simple over the run (± 95% CI over trials) | trials reaching target |",
                    "|---|---|---|---|---|---|---|---|"]
    simple, over_run = _last_noise_scale(trials), run_noise_scale(trials)
    for series in sorted(set(m.points) | set(m.missed)):
        f = m.fits.get(series)
        reached, total = len(m.points.get(series, [])), len(m.points.get(series, [])) + len(m.missed.get(series, []))
        cell = (f"{f.b_noise:.1f} [{f.ci[0]:.1f}, {f.ci[1]:.1f}]" if f and math.isfinite(f.b_noise)
                else ("S_min <= 0: no finite B_noise" if f else "–"))
        if f and f.valid_fraction < 1:
            cell += f" ({f.valid_fraction:.0%} of resamples finite)"
        if f and (outside := f.extrapolation()):
            cell += f" ({outside})"
        s_min, e_min = (f"{f.s_min:.0f}", f"{f.e_min:.0f}") if f else ("–", "–")
        if series in m.unresolved:
            cell += " (not resolved)"
        lines.append(f"| {series} | {m.targets.get(series, math.nan):.1f} | {cell} | {s_min} | {e_min} "
                     f"| {simple.get(series, math.nan):.1f} | {_pm(over_run.get(series))} | {reached}/{total}"
                     + (f" ({len(m.censored[series])} censored)" if m.censored.get(series) else "") + " |")
    lines += _missed_lines(m)
    for series in m.unresolved:
        lines.append(f"- {series}: every trial was at the target by its first evaluation, so its steps to the target "
                     "are that evaluation's iteration at every batch size: its B_noise says nothing"
                     + (" (a shared target set by a slower series; try `study.critical_batch.target=per_series`)."
                        if scope == "shared" else " (evaluate earlier: more `study.budget.evals`)."))
    files = [_plot(trials, m, out / "critical_batch.png", title)]
    lines += ["", "![critical_batch.png](critical_batch.png)", "",
              "Left: steps vs images to the target (one point per trial, the fit as a line, B marked at "
              "the mean points of the trials that reached it; an open triangle: a censored trial at its last "
              "evaluation, a lower bound); right: the measured B_simple = tr(Σ)/|G|² (`eval/noise_scale`, mean over seeds) "
              "against images seen, dotted lines at the fitted B_noise."]
    if not any(t.curves.get(NOISE_SCALE) for t in trials):
        lines.append("- No trial logged `eval/noise_scale` (set `diagnostics.noise_scale.enabled=true`).")
    else:
        lines += noise_scale_comparison(trials)
    rules = lr_rule_spread(m)
    if rules:
        lines += ["", "### Learning-rate scaling", "",
                  "Measure: coefficient of variation (std/mean) across batch sizes of the mean images to the target; "
                  "lower is flatter (convergence per image independent of the batch size). A series that misses "
                  "the target in some trial ranks after those that never do."
                  + (" Each series is measured at its own target (per_series): the CV is unit-free, but a rule "
                     "whose worst batch size trains slowly gets a looser target." if scope == "per_series" else ""), "",
                  "| series | target FID | images to target by batch size | CV | max/min |", "|---|---|---|---|---|"]
        for r in rules:
            per = ", ".join(f"b{b}: {v:.0f}" for b, v in r["images"].items())
            if r["missed_batches"]:
                per += "; some seeds missed at " + ", ".join(f"b{b}" for b in r["missed_batches"])
            lines.append(f"| {r['series']} | {m.targets.get(r['series'], math.nan):.1f} | {per} | {r['cv']:.3f} "
                         f"| {r['max_over_min']:.2f} |")
        best: dict[Group, dict] = {}
        for r in rules:               # ranked: the first row of each remaining series is its flattest rule
            best.setdefault(r["series"].without(LR_RULE), r)
        for rest, r in best.items():
            lines.append(f"- Flattest for {rest}: {r['series'].part(LR_RULE)} (CV {r['cv']:.3f}).")
    return SectionOutput(lines, files)


def _resamples_sentence(fits) -> str:
    """How many distinct resamples the bootstrap had, and, where few, that its bracket is their spread."""
    counts = sorted({(f.seeds, f.distinct_resamples) for f in fits if f.seeds})
    if not counts:
        return ""
    said = ", ".join(f"{n} seeds: {d}" for n, d in counts)
    text = f" n seeds have C(2n−1, n) distinct resamples ({said})"
    few = [d for _, d in counts if d < BOOTSTRAP_DISTINCT]
    if few:
        text += (f"; too few seeds for the bootstrap: the bracket is the 2.5–97.5 percentiles of {max(few)} or fewer "
                 "distinct refits (close to their range), not a 95% interval")
    return text + "."


def _missed_lines(m: Measurement) -> list[str]:
    """Per series, the trials that never reached the target: censored in the fit (per batch size
    and budget, out of that batch size's trials), or never evaluated and so out of it."""
    lines = []
    for series, missed in sorted(m.missed.items()):
        censored = m.censored.get(series, [])
        by_bound: dict[tuple[int, float], list[str]] = {}
        for p in censored:
            by_bound.setdefault((p.batch, p.steps), []).append(p.seed)
        batches = [p.batch for p in m.points.get(series, [])] + [b for b, _ in missed]
        parts = [f"{len(seeds)} of {batches.count(b)} b{b} seeds censored at {bound:.0f} iterations "
                 f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})"
                 for (b, bound), seeds in sorted(by_bound.items())]
        if parts:
            lines.append(f"- {series}: never reached the target, in the fit as censored: " + "; ".join(parts) + ".")
        bare = [(b, s) for b, s in missed if not any(p.batch == b and p.seed == s for p in censored)]
        if bare:
            lines.append(f"- {series}: never evaluated, not in the fit: "
                         + ", ".join(f"b{b} seed {s}" for b, s in bare) + ".")
    return lines


def _last_noise_scale(trials) -> dict[Group, float]:
    values: dict[Group, list[float]] = {}
    for t in trials:
        curve = t.curves.get(NOISE_SCALE)
        if curve:
            values.setdefault(series_of(t), []).append(curve[-1][1])
    return {s: float(np.mean(v)) for s, v in values.items()}


def _run_noise_scale(trial) -> float | None:
    """A trial's B_simple averaged over its evaluations after the first (the EMA's warm-up)."""
    curve = [v for _, v in (trial.curves.get(NOISE_SCALE) or [])[1:] if math.isfinite(v)]
    return float(np.mean(curve)) if curve else None


def run_noise_scale(trials) -> dict[Group, tuple[float, float, int]]:
    """Per series: each trial's B_simple over the run, mean ± 95% t-interval over the trials
    (seeds × batch sizes)."""
    values: dict[Group, list[float]] = {}
    for t in trials:
        value = _run_noise_scale(t)
        if value is not None:
            values.setdefault(series_of(t), []).append(value)
    return {s: mean_ci(v) for s, v in values.items()}


def _plot(trials, m: Measurement, path: Path, title: str) -> str:
    plt = pyplot()
    import matplotlib.ticker
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    palette = plt.get_cmap("tab10")
    colours = {s: palette(i % 10) for i, s in enumerate(sorted(set(m.points) | set(m.missed)))}
    for series, points in sorted(m.points.items()):
        colour = colours[series]
        left.scatter([p.images for p in points], [p.steps for p in points], color=colour, s=12, alpha=0.5)
        bounds = m.censored.get(series, [])
        if bounds:
            left.scatter([p.images for p in bounds], [p.steps for p in bounds], marker="^", facecolors="none",
                         edgecolors=colour, s=24)
        f = m.fits.get(series)
        if f and math.isfinite(f.b_noise) and f.b_noise > 0:
            batches = np.geomspace(min(p.batch for p in points) / 2, max(p.batch for p in points) * 2, 100)
            steps = f.steps(batches)
            left.plot(steps * batches, steps, color=colour, label=f"{series}: B_noise {f.b_noise:.0f}")
        for b in sorted({p.batch for p in points}):
            mean = [p for p in points if p.batch == b]
            left.annotate(f"{b}", (np.mean([p.images for p in mean]), np.mean([p.steps for p in mean])),
                          fontsize=7, color=colour)
    left.set_xscale("log"), left.set_yscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("images to target (E)"), left.set_ylabel("steps to target (S)")
    left.set_title(f"steps vs images to FID {m.target:.2f}" if m.scope == "shared"
                   else "steps vs images to each series' target FID")
    left.grid(alpha=0.3, which="both")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=7)
    # Right: the measured noise scale per (series without its lr rule, batch size), averaged over
    # seeds and rules (the estimator does not depend on the lr; 24 lines of a crossed study would
    # not be readable), the fitted B_noise of each series dotted in its loss's colour.
    styles = ["-", "--", "-.", ":"]
    batches = sorted({t.batch_size for t in trials})
    rests = sorted({series_of(t).without(LR_RULE) for t in trials})
    rest_colours = {r: palette(i % 10) for i, r in enumerate(rests)}
    crossed = any(t.group.get(LR_RULE) is not None for t in trials)
    for rest in rests:
        for i, b in enumerate(batches):
            members = [t for t in trials if series_of(t).without(LR_RULE) == rest and t.batch_size == b]
            style = {"color": rest_colours[rest], "linestyle": styles[i % len(styles)]}
            seeds_and_mean(right, members, NOISE_SCALE, style, f"{rest}, b{b}", seeds=False, linewidth=1)
    for series, f in sorted(m.fits.items()):
        if math.isfinite(f.b_noise) and f.b_noise > 0:
            colour = rest_colours.get(series.without(LR_RULE), "grey")
            right.axhline(f.b_noise, color=colour, linestyle=":", linewidth=1)
            if crossed:
                right.annotate(f"B_noise, {series.part(LR_RULE)}", (1.0, f.b_noise), xycoords=("axes fraction", "data"),
                               ha="right", va="bottom", fontsize=6, color=colour)
    right.set_xlabel("images seen"), right.set_ylabel("B_simple = tr(Σ)/|G|²")
    right.set_yscale("log")
    right.set_title("measured gradient noise scale" + (" (mean over seeds and lr rules)" if crossed else ""))
    right.grid(alpha=0.3, which="both")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title}: critical batch size" if title else "critical batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def noise_scale_comparison(trials) -> list[str]:
    """B_simple over the run per loss (series without its lr rule), pooled over batch sizes and
    rules; with two such series, their difference paired by seed (each seed's mean over batch
    sizes and rules: trials of one seed share data order and noise, so the seed is the
    independent unit), and how often it has the same sign per batch size."""
    by_rest: dict[Group, dict[tuple[int, str, str], float]] = {}     # loss -> (batch, rule, seed) -> B_simple
    for t in trials:
        value = _run_noise_scale(t)
        if value is not None:
            series = series_of(t)
            by_rest.setdefault(series.without(LR_RULE), {})[(t.batch_size, series.part(LR_RULE), t.seed)] = value
    if not by_rest:
        return []
    lines = ["- B_simple over the run (each trial's mean after its first evaluation), pooled over batch sizes"
             + (" and lr rules" if any(t.group.get(LR_RULE) is not None for t in trials) else "") + ": "
             + "; ".join(f"{rest} {_pm(mean_ci(list(v.values())))}" for rest, v in sorted(by_rest.items())) + "."]
    if len(by_rest) == 2:
        (a, va), (b, vb) = sorted(by_rest.items())

        def per(values: dict[tuple[int, str, str], float], part: int) -> dict:
            """Means over everything but key element `part` (0: batch size, 2: seed)."""
            groups: dict = {}
            for key, value in values.items():
                groups.setdefault(key[part], []).append(value)
            return {k: float(np.mean(v)) for k, v in groups.items()}
        c = paired(per(va, 2), per(vb, 2))
        ba, bb = per(va, 0), per(vb, 0)
        higher = sum(ba[k] > bb[k] for k in ba if k in bb)
        lines.append(f"- {a} − {b}, each seed's mean over batch sizes and rules, paired by seed: "
                     f"{c.verdict('lower', 'higher')}; {a} higher at {higher} of {len(set(ba) & set(bb))} batch sizes "
                     "(means over seeds and rules).")
    return lines


def _pm(stat: tuple[float, float, int] | None) -> str:
    if stat is None or not math.isfinite(stat[0]):
        return "–"
    mean, half, n = stat
    return f"{mean:.1f} ± {half:.1f} (n={n})" if math.isfinite(half) else f"{mean:.1f} (n={n})"

