"""The critical batch size of a batch-size sweep (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training"): steps S and images E to a target FID follow
S(B) = S_min (1 + B_noise/B) and E(B) = B·S(B) = E_min (1 + B/B_noise), E_min = S_min·B_noise.
Both are one linear least-squares fit of S on 1/B (intercept S_min, slope S_min·B_noise);
B_noise gets a bootstrap CI over seeds. Beside it: the measured noise scale B_simple
(`eval/noise_scale`), and, when `lr_scaling` is swept, which rule keeps images-to-target
flattest across batch sizes.

Target FID: one shared by every series, the worst (batch size, loss, rule) group's best
seed-mean FID, so every group's mean curve reaches it and B_noise compares across losses at
the same image quality (B_noise grows as training progresses, so per-loss targets would
compare losses at different stages). Steps to it are interpolated linearly between evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ayt.metrics import short
from ayt.training.noise_scale import NOISE_SCALE

BATCH = "batch_size"
LR_RULE = "lr_scaling"
MIN_SEEDS, MIN_BATCHES = 2, 3
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Point:
    """One trial's distance to the target: steps (interpolated iteration) and images."""

    series: str          # the trial's group without the batch size, e.g. "loss=mfd"
    batch: int
    seed: str
    steps: float

    @property
    def images(self) -> float:
        return self.steps * self.batch


@dataclass(frozen=True)
class NoiseFit:
    s_min: float
    b_noise: float       # nan where the fit has S_min <= 0 (no minimum number of steps)
    ci: tuple[float, float] = (math.nan, math.nan)
    valid_fraction: float = math.nan     # bootstrap refits with S_min > 0

    @property
    def e_min(self) -> float:
        return self.s_min * self.b_noise

    def steps(self, batch: np.ndarray) -> np.ndarray:
        return self.s_min * (1 + self.b_noise / batch)


def crossing(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """First iteration at which the FID curve reaches `target`, linear between evaluations
    (the first evaluation itself if it is already there; None if never)."""
    previous = None
    for step, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def _sums(points: Sequence[Point]) -> np.ndarray:
    """[n, Σx, Σx², Σy, Σxy] with x = 1/B, y = S: the sufficient statistics of the fit."""
    x = np.array([1.0 / p.batch for p in points])
    y = np.array([p.steps for p in points])
    return np.array([len(points), x.sum(), (x * x).sum(), y.sum(), (x * y).sum()])


def _solve(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y = a + c x from stacked sufficient statistics (..., 5) -> (a, c)."""
    n, sx, sxx, sy, sxy = np.moveaxis(sums, -1, 0)
    det = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (n * sxy - sx * sy) / det
        a = (sy - c * sx) / n
    return a, c


def fit(points: Sequence[Point], bootstrap: int = BOOTSTRAP, rng_seed: int = BOOTSTRAP_SEED) -> NoiseFit:
    """S_min and B_noise of S(B) = S_min (1 + B_noise/B); the 95% percentile CI of B_noise
    from resampling seeds with replacement (all of a drawn seed's points, with multiplicity)."""
    a, c = _solve(_sums(points))
    b_noise = float(c / a) if a > 0 else math.nan
    seeds = sorted({p.seed for p in points})
    per_seed = np.stack([_sums([p for p in points if p.seed == s]) for s in seeds])
    rng = np.random.default_rng(rng_seed)
    counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=bootstrap)
    a_b, c_b = _solve(counts @ per_seed)
    ok = np.isfinite(a_b) & np.isfinite(c_b) & (a_b > 0)
    ci = tuple(float(q) for q in np.percentile(c_b[ok] / a_b[ok], [2.5, 97.5])) if ok.any() else (math.nan, math.nan)
    return NoiseFit(float(a), b_noise, ci, float(ok.mean()))


@dataclass
class Measurement:
    """Everything the section shows, computed from the trials."""

    target: float | None
    points: dict[str, list[Point]] = field(default_factory=dict)      # series -> reached points
    missed: dict[str, list[tuple[int, str]]] = field(default_factory=dict)   # series -> (batch, seed) never reached
    fits: dict[str, NoiseFit] = field(default_factory=dict)


def series_of(trial) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial.group if k != BATCH) or "all"


def shared_target(trials, key: str) -> float | None:
    """The worst group's best seed-mean FID (at evaluations every seed of the group has; the
    mean of the seeds' best FIDs where they share none)."""
    best = []
    for group in {t.group for t in trials}:
        curves = [dict(t.curves.get(key, [])) for t in trials if t.group == group]
        curves = [c for c in curves if c]
        steps = set.intersection(*(set(c) for c in curves)) if curves else set()
        if steps:
            best.append(min(np.mean([c[s] for c in curves]) for s in steps))
        elif curves:
            best.append(np.mean([min(c.values()) for c in curves]))
    return float(max(best)) if best else None


def measure(trials, key: str, bootstrap: int = BOOTSTRAP) -> Measurement:
    out = Measurement(shared_target(trials, key))
    if out.target is None:
        return out
    for t in trials:
        steps = crossing(t.curves.get(key, []), out.target)
        series = series_of(t)
        if steps is None:
            out.missed.setdefault(series, []).append((t.batch_size, t.seed))
        else:
            out.points.setdefault(series, []).append(Point(series, t.batch_size, t.seed, steps))
    for series, points in out.points.items():
        if len({p.batch for p in points}) >= 2:
            out.fits[series] = fit(points, bootstrap)
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
        if f"{LR_RULE}=" not in series:
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


@dataclass
class Section:
    lines: list[str]
    files: list[str] = field(default_factory=list)


def section(trials, key: str, out: Path, title: str = "", bootstrap: int = BOOTSTRAP) -> Section:
    """The report's "Critical batch size" section (empty when batch size is not swept)."""
    if not trials or not all(BATCH in t.axes for t in trials):
        return Section([])
    head = ["", "## Critical batch size", ""]
    lacking = requirements(trials)
    if lacking:
        return Section(head + [f"- Not computed: the sweep has {lacking}."])
    m = measure(trials, key, bootstrap)
    if m.target is None:
        return Section(head + ["- Not computed: no trial has an FID curve."])
    lines = head + [f"Target {short(key)} {m.target:.2f}: the worst group's best seed-mean FID, shared by every "
                    "series so B_noise compares at the same image quality; steps to it interpolated between "
                    "evaluations. Fit S(B) = S_min (1 + B_noise/B), E(B) = E_min (1 + B/B_noise) by least squares "
                    f"of S on 1/B; 95% CI of B_noise: percentile bootstrap over seeds ({bootstrap} resamples; with few "
                    "seeds it is too narrow: 76% coverage at 3 seeds, 88% at 5 on synthetic sweeps with 5% noise).", "",
                    "| series | B_noise [95% CI] | S_min (steps) | E_min (images) | B_simple (last eval, mean) "
                    "| trials reaching target |", "|---|---|---|---|---|---|"]
    simple = _last_noise_scale(trials)
    for series in sorted(set(m.points) | set(m.missed)):
        f = m.fits.get(series)
        reached, total = len(m.points.get(series, [])), len(m.points.get(series, [])) + len(m.missed.get(series, []))
        cell = (f"{f.b_noise:.1f} [{f.ci[0]:.1f}, {f.ci[1]:.1f}]" if f and math.isfinite(f.b_noise)
                else ("S_min <= 0: no finite B_noise" if f else "–"))
        if f and f.valid_fraction < 1:
            cell += f" ({f.valid_fraction:.0%} of resamples finite)"
        s_min, e_min = (f"{f.s_min:.0f}", f"{f.e_min:.0f}") if f else ("–", "–")
        lines.append(f"| {series} | {cell} | {s_min} | {e_min} | {simple.get(series, math.nan):.1f} | {reached}/{total} |")
    for series, missed in sorted(m.missed.items()):
        lines.append(f"- {series}: never reached the target: " + ", ".join(f"b{b} seed {s}" for b, s in missed) + ".")
    files = [_plot(trials, m, out / "critical_batch.png", title)]
    lines += ["", "![critical_batch.png](critical_batch.png)", "",
              "Left: steps vs images to the target (one point per trial, the fit as a line, B marked at "
              "the mean points); right: the measured B_simple = tr(Σ)/|G|² (`eval/noise_scale`, mean over seeds) "
              "against images seen, dotted lines at the fitted B_noise."]
    if not any(t.curves.get(NOISE_SCALE) for t in trials):
        lines.append("- No trial logged `eval/noise_scale` (set `diagnostics.noise_scale.enabled=true`).")
    rules = lr_rule_spread(m)
    if rules:
        lines += ["", "### Learning-rate scaling", "",
                  "Measure: coefficient of variation (std/mean) across batch sizes of the mean images to the target; "
                  "lower is flatter (convergence per image independent of the batch size). A series that misses "
                  "the target in some trial ranks after those that never do.", "",
                  "| series | images to target by batch size | CV | max/min |", "|---|---|---|---|"]
        for r in rules:
            per = ", ".join(f"b{b}: {v:.0f}" for b, v in r["images"].items())
            if r["missed_batches"]:
                per += "; some seeds missed at " + ", ".join(f"b{b}" for b in r["missed_batches"])
            lines.append(f"| {r['series']} | {per} | {r['cv']:.3f} | {r['max_over_min']:.2f} |")
        lines.append(f"- Flattest: {rules[0]['series']} (CV {rules[0]['cv']:.3f}).")
    return Section(lines, files)


def _last_noise_scale(trials) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for t in trials:
        curve = t.curves.get(NOISE_SCALE)
        if curve:
            values.setdefault(series_of(t), []).append(curve[-1][1])
    return {s: float(np.mean(v)) for s, v in values.items()}


def _plot(trials, m: Measurement, path: Path, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    palette = plt.get_cmap("tab10")
    colours = {s: palette(i % 10) for i, s in enumerate(sorted(set(m.points) | set(m.missed)))}
    for series, points in sorted(m.points.items()):
        colour = colours[series]
        left.scatter([p.images for p in points], [p.steps for p in points], color=colour, s=12, alpha=0.5)
        f = m.fits.get(series)
        if f and math.isfinite(f.b_noise) and f.b_noise > 0:
            batches = np.geomspace(min(p.batch for p in points) / 2, max(p.batch for p in points) * 2, 100)
            steps = f.steps(batches)
            left.plot(steps * batches, steps, color=colour, label=f"{series}: B_noise {f.b_noise:.0f}")
            right.axhline(f.b_noise, color=colour, linestyle=":", linewidth=1)
        for b in sorted({p.batch for p in points}):
            mean = [p for p in points if p.batch == b]
            left.annotate(f"{b}", (np.mean([p.images for p in mean]), np.mean([p.steps for p in mean])),
                          fontsize=7, color=colour)
    left.set_xscale("log"), left.set_yscale("log")
    left.set_xlabel("images to target (E)"), left.set_ylabel("steps to target (S)")
    left.set_title(f"steps vs images to FID {m.target:.2f}")
    left.grid(alpha=0.3, which="both")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=7)
    styles = ["-", "--", "-.", ":"]
    batches = sorted({t.batch_size for t in trials})
    for series in sorted(colours):
        for i, b in enumerate(batches):
            curves = [t.curves[NOISE_SCALE] for t in trials
                      if series_of(t) == series and t.batch_size == b and t.curves.get(NOISE_SCALE)]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
            mean = [np.mean([dict(c)[s] for c in curves]) for s in steps]
            right.plot([s * b for s in steps], mean, color=colours[series], linestyle=styles[i % len(styles)],
                       label=f"{series}, b{b}", linewidth=1)
    right.set_xlabel("images seen"), right.set_ylabel("B_simple = tr(Σ)/|G|²")
    right.set_yscale("log")
    right.set_title("measured gradient noise scale")
    right.grid(alpha=0.3, which="both")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title}: critical batch size" if title else "critical batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def noise_keys(logged: dict[str, float]) -> tuple[str, ...]:
    """The noise-scale history the report loads for a run that logged it."""
    return (NOISE_SCALE,) if NOISE_SCALE in logged else ()
