"""A study's seed plan, before it runs: how many seeds its comparisons need to detect the
difference it names (`study.detect`) at its endpoint, and what that costs.

The spread comes from a pilot (`study.pilot`): a finished study's report directory, whose
curves.csv holds every evaluation of every trial. Each pilot trial is scored at this study's
endpoint (ayt/studies/protocols/endpoint.py), each group paired by seed with its reference
(`study.target.reference`, or the baseline of a confirmation), and the SD of those per-seed
differences is what the paired t-test of this study will face. The seeds needed are the
smallest n whose test (two-sided, at the level the study decides at, 80% power: the noncentral
t of `stats.seeds_needed`) detects `study.detect`; also at the SD's upper 95% bound, since a
pilot of five seeds knows its SD only to ×0.60–2.87. A pilot without reference pairs gives
√2 × its pooled spread across seeds (no pairing benefit assumed), and no pilot gives the seeds
for a difference of 0.5, 1 and 2 SDs, stated as such. The cost is the pilot's measured
training seconds per image seen (trials.csv), scaled to this study's budget.

Tune, Optuna and MLflow plan nothing of the kind; `python -m ayt.studies.<name> --plan` prints
it, and `python -m ayt.studies.protocols.seed_plan DIR ...` compares endpoints on finished studies.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ayt.errors import ConfigError
from ayt.metrics import eval_key, short
from ayt.studies.protocols import decision as decisions
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.engine.group import Group
from ayt.studies.report.stats import LEVEL, POWER, mean_ci, sd_upper_factor, seeds_needed

CURVES_FILE, TRIALS_FILE = "curves.csv", "trials.csv"
SEED_AXIS = "axis.seed"
DEFAULT_EFFECTS = (0.5, 1.0, 2.0)        # without a pilot: detect / SD, stated as such


# ---- study.detect ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Detect:
    amount: float
    relative: bool                       # a fraction of the reference's score

    def absolute(self, reference_score: float) -> float:
        return self.amount * abs(reference_score) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.amount:.3g} ({self.amount * 100:g}% of the reference)" if self.relative else f"{self.amount:g}"


def parse_detect(value: Any) -> Detect | None:
    """`study.detect`: a positive number (the metric's units) or a percentage ("10%"), or None."""
    if value is None:
        return None
    text = str(value).strip()
    relative = text.endswith("%")
    try:
        amount = float(text[:-1] if relative else text)
    except ValueError:
        amount = math.nan
    if not (math.isfinite(amount) and amount > 0):
        raise ConfigError("study.detect", f"must be a positive number (e.g. 5) or percentage (e.g. 10%), got {value!r}")
    return Detect(amount / 100 if relative else amount, relative)


# ---- the pilot ------------------------------------------------------------------------------

@dataclass
class PilotTrial:
    run: str
    group: Group
    seed: str
    curve: list[tuple[float, float]]                 # (images seen, value)
    train_seconds: float | None = None
    images: float | None = None                      # images it trained on


@dataclass
class Pilot:
    path: Path
    metric: str                                      # eval key
    trials: list[PilotTrial] = field(default_factory=list)

    def scores(self, endpoint: Endpoint) -> dict[Group, dict[str, float]]:
        out: dict[Group, dict[str, float]] = {}
        for t in self.trials:
            value = endpoint.score(t.curve)
            if math.isfinite(value):
                out.setdefault(t.group, {})[t.seed] = value
        return out

    def evaluations(self) -> int:
        return min((len(t.curve) for t in self.trials), default=0)

    def seconds_per_image(self) -> float | None:
        """Training seconds per image seen, over the pilot's trials that recorded both."""
        rates = [t.train_seconds / t.images for t in self.trials if t.train_seconds and t.images]
        return float(np.mean(rates)) if rates else None


def pilot_path(study: Mapping[str, Any], base_dir: str | Path | None = None) -> Path | None:
    value = study.get("pilot")
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def load_pilot(path: Path, metric: str, where: str = "study.pilot") -> Pilot:
    """The pilot's curves of `metric` (and its trial durations); a ConfigError naming `where`
    when the directory or its curves.csv is missing or the pilot measured another metric."""
    curves = path / CURVES_FILE
    if not path.is_dir():
        raise ConfigError(where, f"{path} does not exist; name a finished study's report directory (e.g. "
                          "studies/speed_3200, with its curves.csv)")
    if not curves.is_file():
        raise ConfigError(where, f"{path} has no {CURVES_FILE}: not a finished study's report directory")
    column = short(eval_key(metric))
    with curves.open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    measured = [c for c in header if c not in ("run", "iteration", "images_seen") and not c.startswith("axis.")
                and "/" not in c]
    if column not in header or not any(r.get(column) for r in rows):
        raise ConfigError(where, f"{path} measured {', '.join(measured) or 'nothing'}, not {column} "
                          "(study.metric); name a pilot that evaluated it")
    pilot = Pilot(path, eval_key(metric))
    by_run: dict[str, PilotTrial] = {}
    for r in rows:
        if not r.get(column):
            continue
        trial = by_run.get(r["run"])
        if trial is None:
            axes = [(k[len("axis."):], v) for k, v in r.items() if k.startswith("axis.") and k != SEED_AXIS]
            trial = by_run[r["run"]] = PilotTrial(r["run"], Group.of(axes), r.get(SEED_AXIS, r["run"]), [])
        trial.curve.append((float(r["images_seen"]), float(r[column])))
    trials_csv = path / TRIALS_FILE
    if trials_csv.is_file():
        with trials_csv.open(newline="") as f:
            for r in csv.DictReader(f):
                trial = by_run.get(r.get("run", ""))
                if trial is not None and r.get("train_seconds") and r.get("status", "FINISHED") == "FINISHED":
                    trial.train_seconds = float(r["train_seconds"])
                    trial.images = max(x for x, _ in trial.curve)
    for trial in by_run.values():
        trial.curve.sort()
    pilot.trials = sorted(by_run.values(), key=lambda t: (t.group.sort_key(), t.seed))
    return pilot


# ---- what the pilot says at an endpoint -----------------------------------------------------

@dataclass(frozen=True)
class Spread:
    """One comparison's per-seed differences in the pilot (or the unpaired fallback)."""

    label: str                           # `loss=mfd vs loss=pseudo_huber`, or what it stands for
    n: int
    mean: float                          # the pilot's difference (nan: unpaired fallback)
    sd: float                            # SD of the per-seed differences
    reference_score: float               # the reference group's mean score (what `detect: 10%` is of)
    paired: bool = True

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        from scipy import stats
        if self.n < 2 or not math.isfinite(self.mean):
            return math.nan, math.nan
        half = stats.t.ppf(0.5 + level / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def sd_upper(self) -> float:
        return self.sd * sd_upper_factor(self.n - 1)


def spreads(pilot: Pilot, reference: Mapping[str, Any], endpoint: Endpoint) -> list[Spread]:
    """Each pilot group against its reference, paired by seed, at `endpoint`; where the pilot has
    no such pairs, one unpaired stand-in: √2 × the pooled SD across seeds within its groups."""
    scores = pilot.scores(endpoint)
    out = []
    for group, mine in scores.items():
        ref = group.replace(reference) if reference and set(reference) <= set(group.keys) else None
        if ref is None or ref == group or ref not in scores:
            continue
        seeds = sorted(set(mine) & set(scores[ref]))
        d = np.asarray([mine[s] - scores[ref][s] for s in seeds])
        if len(d) >= 2:
            out.append(Spread(f"{group.label} vs {ref.label}", len(d), float(d.mean()), float(d.std(ddof=1)),
                              float(np.mean(list(scores[ref].values())))))
    if out:
        return out
    groups = [np.asarray(list(v.values())) for v in scores.values() if len(v) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return []
    pooled = math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)
    level = float(np.mean([v for g in scores.values() for v in g.values()]))
    return [Spread("no reference pairs in the pilot: √2 × its pooled SD across seeds", dof + 1, math.nan,
                   math.sqrt(2) * pooled, level, paired=False)]


# ---- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Need:
    spread: Spread
    detect: float                        # absolute
    seeds: int | None                    # at the observed SD
    seeds_upper: int | None              # at its upper 95% bound


@dataclass
class SeedPlan:
    endpoint: Endpoint
    level: float
    detect: Detect | None
    pilot: Pilot | None
    needs: list[Need]
    groups: int | None                   # configurations each seed runs (None: not a fixed grid)
    trial_images: float | None           # images one trial of this study trains on
    cores_per_trial: float
    note: str = ""

    @property
    def seeds(self) -> int | None:
        known = [n.seeds for n in self.needs]
        return None if not known or any(s is None for s in known) else max(known)

    def core_hours(self, seeds: int | None) -> float | None:
        rate = self.pilot.seconds_per_image() if self.pilot else None
        if seeds is None or rate is None or not self.groups or not self.trial_images:
            return None
        return seeds * self.groups * self.trial_images * rate * self.cores_per_trial / 3600

    def lines(self) -> list[str]:
        power = f"{POWER:.0%} power, two-sided paired t-test at {self.level:.1%}"
        out = [f"seed plan at endpoint `{self.endpoint.label}` ({self.endpoint.words}), {power}:"]
        if self.note:
            out.append(f"  {self.note}")
        if self.pilot is None:
            out.append("  no pilot (study.pilot): the SD of a paired difference is unknown; a difference of 0.5, 1 "
                       "or 2 SDs needs " + ", ".join(f"{_n(seeds_needed(e, 1.0, lambda n: n - 1, self.level))}"
                                                      for e in DEFAULT_EFFECTS)
                       + " seeds; name a finished study in study.pilot for this study's numbers and cost")
            return out
        out.append(f"  pilot {self.pilot.path} ({len(self.pilot.trials)} trials, {self.pilot.evaluations()} "
                   f"evaluations each), scored at `{self.endpoint.label}`:")
        for need in self.needs:
            s = need.spread
            if s.paired:
                low, high = s.interval()
                seen = f"difference {s.mean:+.3g} [{low:+.3g}, {high:+.3g}], "
            else:
                seen = ""
            out.append(f"  - {s.label}: {seen}SD {s.sd:.3g} over n={s.n} (up to {s.sd_upper:.3g} at its upper 95% "
                       f"bound); detecting ±{need.detect:.3g} needs {_n(need.seeds)} seeds "
                       f"({_n(need.seeds_upper)} if the SD is at that bound)")
        seeds = self.seeds
        if seeds is None:
            out.append("  the difference named is ~0 next to the spread: no number of seeds up to 10,000 detects it")
            return out
        upper = [n.seeds_upper for n in self.needs]
        seeds_upper = None if any(s is None for s in upper) else max(upper)
        cost = self.core_hours(seeds)
        rate = self.pilot.seconds_per_image()
        trials = f"{seeds * self.groups} trials ({self.groups} per seed)" if self.groups else "per compared configuration"
        out.append(f"  this study needs {seeds} seeds: {trials}"
                   + (f", {cost:.2f} core-hours at the pilot's measured {rate * 1000:.3g} training seconds per 1,000 "
                      f"images ({self.cores_per_trial:g} core(s) per trial, evaluation time not included); "
                      f"{seeds_upper} seeds, {self.core_hours(seeds_upper):.2f} core-hours, if the SD is at its "
                      "upper bound" if cost is not None and seeds_upper is not None else
                      "; no trial durations in the pilot's trials.csv to cost them"))
        return out


def _n(value: int | None) -> str:
    return "more than 10,000" if value is None else str(value)


def reference_of(study: Mapping[str, Any]) -> dict[str, str]:
    """What the study compares each group with: `study.target.reference`, or a confirmation's baseline."""
    if str(study["protocol"]["name"]) == "search_then_confirm":
        return {"candidate": "baseline"}
    return {k: str(v) for k, v in ((study.get("target") or {}).get("reference") or {}).items()}


def check(study: Mapping[str, Any], base_dir: str | Path | None = None) -> Pilot | None:
    """`study.detect` and `study.pilot`, before any work: a number or percentage; a finished
    study that measured this study's metric, with the evaluations this endpoint averages."""
    parse_detect(study.get("detect"))
    path = pilot_path(study, base_dir)
    if path is None:
        return None
    pilot = load_pilot(path, str(study["metric"]))
    endpoint = decisions.of(study).endpoint
    need = endpoint.k if endpoint.name == "last_k" else 2 if endpoint.name == "auc" else 1
    if pilot.evaluations() < need:
        raise ConfigError("study.pilot", f"{path} has {pilot.evaluations()} evaluation(s) per trial; endpoint "
                          f"{endpoint.label} needs {need} to score them")
    return pilot


def plan_seeds(plan: Any) -> SeedPlan:
    """The seed plan of a planned study (`ayt.studies.engine.plan.StudyPlan`)."""
    study = plan.study
    decision = decisions.of(study)
    pilot = check(study, plan.base_dir or None)
    detect = parse_detect(study.get("detect"))
    space = plan.space
    confirm = str(study["protocol"]["name"]) == "search_then_confirm"
    groups = (int(study["protocol"]["confirm"]["k"]) + 1 if confirm else
              space.trial_count() // len(space.seeds) if space.search == "grid" else None)
    images = [float(c.training.iterations) * float(c.batch_size) for c in plan.trial_configs]
    from ayt.preflight import worker_bundle
    cores = worker_bundle(plan.base).get("CPU", 1.0) * int(plan.base.scaling.num_workers)
    note = ("a confirmation stage: its candidates against the baseline on `protocol.confirm.seeds`" if confirm else "")
    needs = []
    if pilot is not None:
        found = spreads(pilot, reference_of(study), decision.endpoint)
        if detect is None:
            note = (note + "; " if note else "") + "no study.detect: the seeds for 10% of the reference's score"
            detect = Detect(0.10, True)
        for s in found:
            amount = detect.absolute(s.reference_score)
            needs.append(Need(s, amount, seeds_needed(amount, s.sd, lambda n: n - 1, decision.level),
                              seeds_needed(amount, s.sd_upper, lambda n: n - 1, decision.level)))
    return SeedPlan(decision.endpoint, decision.level, detect, pilot, needs, groups,
                    float(np.mean(images)) if images else None, cores, note)


# ---- endpoints compared on finished studies (docs/statistics.md) -----------------------------

def compare_endpoints(path: Path, metric: str, reference: Mapping[str, str], endpoints: Sequence[Endpoint],
                      relative: float = 0.10) -> list[str]:
    """One line per endpoint: the pilot's paired difference, its SD and the seeds a `relative`
    difference of the reference's score needs at 95%, 80% power."""
    pilot = load_pilot(path, metric, where=str(path))
    out = []
    for endpoint in endpoints:
        for s in spreads(pilot, reference, endpoint):
            low, high = s.interval()
            n = seeds_needed(relative * abs(s.reference_score), s.sd, lambda k: k - 1)
            ref, _, _ = mean_ci([s.reference_score])
            out.append(f"{path.name} {short(eval_key(metric))} {endpoint.label:>7}: {s.label}: {s.mean:+.1f} "
                       f"[{low:+.1f}, {high:+.1f}] paired SD {s.sd:.1f} (upper 95% bound {s.sd_upper:.1f}), n={s.n}; "
                       f"{relative:.0%} of the reference's {ref:.1f} needs {_n(n)} seeds")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ayt.studies.protocols.seed_plan",
                                     description="Paired SD and seeds needed at each endpoint, from finished studies' "
                                                 "curves.csv")
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--reference", default="loss=pseudo_huber", help="axis=value of the reference group")
    parser.add_argument("--metrics", default="fid_1step,fid_2step")
    parser.add_argument("--endpoints", default="final,last_3,auc", help="final, last_<k>, auc")
    parser.add_argument("--relative", type=float, default=0.10)
    args = parser.parse_args(argv)
    key, _, value = args.reference.partition("=")
    chosen = [Endpoint("last_k", int(e[len("last_"):])) if e.startswith("last_") else Endpoint(e)
              for e in args.endpoints.split(",")]
    for path in args.dirs:
        for metric in args.metrics.split(","):
            print("\n".join(compare_endpoints(path, metric, {key: value}, chosen, args.relative)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
