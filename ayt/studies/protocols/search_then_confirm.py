"""`search_then_confirm`: a search, then its best found re-tested against a baseline on seeds
the search did not use.

The best of many single-seed trials is biased low (the winner's curse: it won partly by its
seed's luck), and a search alone never says whether it beats the defaults. So:

  stage 1 (search)   the study as written (tpe, gp, random, or a grid), on `study.seeds`;
  stage 2 (confirm)  its best `confirm.k` configurations that ran the whole budget (a trial
                     ASHA stopped early was scored at a lower fidelity) and the baseline
                     (`confirm.baseline`: searched key -> value, or the config's defaults) each
                     on `confirm.seeds`, paired by seed: trials that share a seed share the data
                     order, the noise, the t draws and the FID noise set;
  between them       the baseline on the search's own seeds (`<name>-baseline`, unless
                     `confirm.baseline_on_search_seeds` is false), so the gap between the
                     winner's search score and its confirmation mean splits into the seed
                     effect (the baseline's own change from the search seeds to the
                     confirmation seeds) and the winner's own drop (the rest: how much of its
                     lead over the baseline was its seed's luck, the winner's curse).

Every trial is scored at the study's endpoint (ayt/studies/protocols/endpoint.py): the search's ranking,
the candidates' search scores, the verdicts.

Stage 2 is an ordinary grid study on the shared runner, named `<name>-confirm`, with one axis,
`candidate`, whose values are named configurations (`study.candidates`, ayt.studies.engine.space);
its reference is the baseline, so the group table already compares each candidate with it.
`ConfirmSection` states the verdicts (paired t, Holm-adjusted over the k comparisons) and the
winner's curse in the confirm report, and links to it from the search report. Both stages
resume like any study; the candidates follow from the finished search, so a resumed stage 2
is the same study. The runner is `tune_backend.run_search_then_confirm`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig

from ayt.eval.metrics import better as better_than
from ayt.eval.metrics import direction, ranked, words
from ayt.errors import ConfigError
from ayt.metrics import short
from ayt.studies.report.plots import pyplot, save_figure
from ayt.studies.report.search import value_of
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.report.table import fmt
from ayt.studies.engine.schema import ConfirmStage  # its fields and defaults: declared once
from ayt.studies.engine.space import CANDIDATE_AXIS, Axis, StudySpace
from ayt.studies.report.stats import LEVEL, holm, mean_ci, paired
from ayt.studies.engine.trials import Trial

CONFIRM_FILE = "confirmation.json"     # what stage 2 was built from, next to its report
BASELINE = "baseline"


@dataclass(frozen=True)
class Candidate:
    name: str                            # best1.. or baseline: the candidate axis' value
    settings: dict[str, Any]             # config key -> value (full precision)
    trial: str | None = None             # the search trial it came from
    search_final: float | None = None    # its final metric there (one seed)
    search_score: float | None = None    # its score there at the study's endpoint
    extra: dict[str, Any] = field(default_factory=dict)


def is_confirm_protocol(study: Mapping[str, Any]) -> bool:
    return str(study["protocol"]["name"]) == "search_then_confirm"


def confirm_name(name: str) -> str:
    return f"{name}-confirm"


def baseline_name(name: str) -> str:
    """The stage that runs the baseline on the search's own seeds."""
    return f"{name}-baseline"


def parse_confirm(study: Mapping[str, Any], space: StudySpace) -> ConfirmStage:
    """`study.protocol.confirm`, with what relates it to the search checked (each field's own
    check is the schema's): one line naming the field on any problem."""
    where = "study.protocol.confirm"
    confirm = study["protocol"]["confirm"]
    if any(a.key == CANDIDATE_AXIS for a in space.axes):
        raise ConfigError("study.axes", f"search_then_confirm builds its own `{CANDIDATE_AXIS}` axis; remove it")
    k, seeds = int(confirm["k"]), [int(s) for s in confirm["seeds"]]
    trials = space.trial_count()
    if k > trials:
        raise ConfigError(f"{where}.k", f"must be <= the search's {trials} trials (study.num_samples), got {k}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}.seeds", f"repeats a seed: {seeds}")
    if len(seeds) < 2:
        raise ConfigError(f"{where}.seeds", f"a paired comparison needs >= 2 seeds, got {seeds}")
    if set(seeds) & set(space.seeds):
        raise ConfigError(f"{where}.seeds", f"{sorted(set(seeds) & set(space.seeds))} are also search seeds "
                          f"(study.seeds={space.seeds}); confirm on seeds the winner was not chosen on")
    baseline = dict(confirm.get("baseline") or {})
    keys = [a.key for a in space.axes]
    for key in baseline:
        if key not in keys:
            raise ConfigError(f"{where}.baseline", f"{key!r} is not a searched key; allowed: " + ", ".join(keys))
    by_key = {a.key: a for a in space.axes}
    for key, value in baseline.items():
        values = by_key[key].values
        if by_key[key].is_group and values is not None and str(value) not in map(str, values):
            raise ConfigError(f"{where}.baseline", f"{key}={value} is not an option of that axis; allowed: "
                              + ", ".join(map(str, values)))
    # A field the block leaves out takes the schema's default (the one declaration).
    return ConfirmStage(**{**dict(confirm), "k": k, "seeds": seeds, "baseline": baseline})


def baseline_overrides(stage: ConfirmStage) -> list[str]:
    """The baseline's overrides on top of the study's base (checked at planning)."""
    return Axis(CANDIDATE_AXIS, values=(BASELINE,),
                settings=((BASELINE, tuple(stage.baseline.items())),)).overrides(BASELINE)


def choose_candidates(trials: Sequence[Trial], space: StudySpace, key: str, k: int,
                      endpoint: Endpoint = Endpoint("final")) -> list[Candidate]:
    """The search's best `k` distinct configurations among the trials that ran the whole budget
    with a finite score at `endpoint`, best first (`best1`, ...)."""
    finished = sorted((t for t in trials if t.status != "FAILED" and not t.stopped_early
                       and math.isfinite(t.score(key, endpoint))), key=lambda t: t.name)
    out: list[Candidate] = []
    seen: set[tuple] = set()
    for t in ranked(finished, lambda t: t.score(key, endpoint), key):    # best first in the metric's direction
        settings = {a.key: value_of(a, t.axes.get(a.key)) for a in space.axes}
        if any(v is None for v in settings.values()):
            continue
        marker = tuple(sorted((k2, repr(v)) for k2, v in settings.items()))
        if marker in seen:
            continue
        seen.add(marker)
        out.append(Candidate(f"best{len(out) + 1}", settings, t.name, t.final(key), t.score(key, endpoint)))
        if len(out) == k:
            break
    return out


def confirm_edit(space: StudySpace, stage: ConfirmStage, candidates: Sequence[Candidate]) -> Callable[[DictConfig], None]:
    """How stage 2 differs from the search: one `candidate` axis (the baseline first: the
    reference), the confirmation seeds, a grid, no early stopping, no sampler."""
    everyone = [Candidate(BASELINE, dict(stage.baseline)), *candidates]

    def edit(study: DictConfig) -> None:
        study.name = confirm_name(space.name)
        study.search = "grid"
        study.axes = {CANDIDATE_AXIS: [c.name for c in everyone]}
        study.candidates = {c.name: dict(c.settings) for c in everyone}
        study.seeds = list(stage.seeds)
        study.num_samples, study.startup_trials = None, None
        study.scheduler = "none"
        study.target.fid, study.target.reference = None, {CANDIDATE_AXIS: BASELINE}
        study.protocol.name, study.protocol.stage = "single", "confirm"
    return edit


def baseline_edit(space: StudySpace, stage: ConfirmStage) -> Callable[[DictConfig], None]:
    """The baseline on the search's own seeds: a grid of one candidate, no early stopping, no
    reference (it is compared in the confirmation's report, with what the search found)."""
    def edit(study: DictConfig) -> None:
        study.name = baseline_name(space.name)
        study.search = "grid"
        study.axes = {CANDIDATE_AXIS: [BASELINE]}
        study.candidates = {BASELINE: dict(stage.baseline)}
        study.seeds = list(space.seeds)
        study.num_samples, study.startup_trials = None, None
        study.scheduler = "none"
        study.target.fid, study.target.reference = None, None
        study.protocol.name, study.protocol.stage = "single", "baseline"
    return edit


def write_confirmation(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def confirmation_record(search_plan: Any, stage: ConfirmStage, candidates: Sequence[Candidate],
                        confirm_dir: Path, searched: int, baseline_search: Mapping[str, float] | None = None,
                        baseline_plan: Any = None) -> dict[str, Any]:
    """What stage 2 was built from (confirmation.json): the search, its candidates with their
    search scores, and the baseline's scores on the search seeds (`baseline_search`: seed ->
    score, from the stage `baseline_plan` ran)."""
    import os

    from omegaconf import OmegaConf
    defaults = {a.key: OmegaConf.select(search_plan.base, a.key) for a in search_plan.space.axes if not a.is_group}
    return {"defaults": {k: v for k, v in defaults.items() if v is not None}, "search_study": search_plan.study_id, "search_seeds": list(search_plan.space.seeds),
            "search_trials": searched, "search_report": os.path.relpath(search_plan.out_dir / "report.md", confirm_dir),
            "metric": str(search_plan.study["metric"]), "k": stage.k, "seeds": list(stage.seeds),
            "baseline": dict(stage.baseline),
            "endpoint": search_plan.endpoint.label,
            "candidates": [{"name": c.name, "settings": c.settings, "trial": c.trial, "search_final": c.search_final,
                            "search_score": c.search_score} for c in candidates],
            **({"baseline_search_seeds": dict(baseline_search),
                "baseline_search_report": os.path.relpath(baseline_plan.out_dir / "report.md", confirm_dir)}
               if baseline_search is not None else {})}


# ---- the report ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    candidate: str
    comparison: Any                      # stats.Comparison: candidate − baseline, paired by seed
    p_holm: float
    words: str


def verdicts(by_candidate: Mapping[str, Mapping[int, float]], level: float = LEVEL,
             key: str = "fid") -> list[Verdict]:
    """Each candidate against the baseline, paired by seed; Holm's step-down over the k
    comparisons keeps the chance of any false "better" at 1 − level; better and worse in the
    metric `key`'s direction."""
    base = by_candidate.get(BASELINE, {})
    names = [n for n in by_candidate if n != BASELINE]
    comps = [paired(by_candidate[n], base, level, direction=direction(key)) for n in names]
    adjusted = holm([c.p for c in comps])
    out = []
    for name, c, p in zip(names, comps, adjusted):
        if not c.available:
            words = f"no verdict ({c.method})"
        elif p < 1 - level:
            words = ("better than the baseline" if c.outcome == "better" else "worse than the baseline")
        else:
            words = "inconclusive" + (f": {c.power_words()}" if c.power_words() else "")
        out.append(Verdict(name, c, p, words))
    return out


def _settings_text(settings: Mapping[str, Any]) -> str:
    if not settings:
        return "the config's defaults"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


class ConfirmSection(Section):
    """Stage 2's verdicts (and, in the search's report, where to find them)."""

    def applies(self, ctx: ReportContext) -> bool:
        study = ctx.plan.study
        if (study.get("protocol") or {}).get("stage") == "baseline":    # the baseline on the search seeds
            return False
        return bool(study.get("candidates")) or is_confirm_protocol(study)

    def write(self, ctx: ReportContext) -> SectionOutput:
        study = ctx.plan.study
        if not study.get("candidates"):               # the search's own report
            confirm = study["protocol"]["confirm"]
            link = f"../{confirm_name(ctx.plan.name)}/report.md"
            return SectionOutput(["", "## Confirmation", "",
                                  f"Protocol search_then_confirm: the best {confirm['k']} configurations that ran the "
                                  f"whole budget and the baseline ({_settings_text(confirm.get('baseline') or {})}) "
                                  f"run again on seeds {list(confirm['seeds'])}, which this search did not use"
                                  + (f", and the baseline on this search's seeds {list(ctx.plan.space.seeds)} "
                                     f"([{baseline_name(ctx.plan.name)}](../{baseline_name(ctx.plan.name)}/report.md))"
                                     if confirm.get("baseline_on_search_seeds") else "")
                                  + f": [{link}]({link})."])
        return self._verdicts(ctx)

    def _verdicts(self, ctx: ReportContext) -> SectionOutput:
        key, study, endpoint = ctx.key, ctx.plan.study, ctx.decision.endpoint
        record_path = ctx.out / CONFIRM_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        source = {c["name"]: c for c in record.get("candidates", [])}
        by_candidate: dict[str, dict[int, float]] = {}
        for t in ctx.trials:
            name = t.group.get(CANDIDATE_AXIS)
            if name is not None and t.status != "FAILED":
                by_candidate.setdefault(name, {})[t.seed] = t.score(key, endpoint)
        order = [n for n in study["candidates"] if n in by_candidate]
        by_candidate = {n: by_candidate[n] for n in order}
        found = verdicts(by_candidate, key=key)
        searched = record.get("search_trials", "?")
        report = record.get("search_report")
        lines = ["", "## Confirmation: the best found against the baseline, on fresh seeds", "",
                 f"The search ({f'[{report}]({report}), ' if report else ''}{searched} trials on seeds "
                 f"{record.get('search_seeds', '?')}) chose the configurations below by their {short(key)} at "
                 f"endpoint `{record.get('endpoint', 'final')}`; "
                 f"each runs here beside the baseline on seeds {list(ctx.plan.space.seeds)}, which the search did "
                 "not use, paired by seed. Verdicts: paired t-interval of candidate − baseline; p adjusted by Holm "
                 f"over the {len(found)} comparisons; better or worse only when the adjusted p < {1 - LEVEL:.2f}.",
                 "", f"| candidate | settings | in the search (one seed) | here: {endpoint.label} {short(key)} | "
                 "− baseline, paired [95% CI] | p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
        m, h, n = mean_ci(list(by_candidate.get(BASELINE, {}).values()))
        settings = study["candidates"].get(BASELINE) or {}
        shown = _settings_text(settings) if settings else "defaults" + (
            ": " + _settings_text(record["defaults"]) if record.get("defaults") else "")
        base_search = {str(s): v for s, v in (record.get("baseline_search_seeds") or {}).items()}
        lines.append(f"| {BASELINE} | {shown} | "
                     + (", ".join(f"{v:.2f}" for v in base_search.values()) if base_search else "–")
                     + f" | {fmt(m, h)} (n={n}) | reference | – | – |")
        records = []
        for v in found:
            c, info = v.comparison, source.get(v.candidate, {})
            m, h, n = mean_ci(list(by_candidate[v.candidate].values()))
            searched_at = info.get("search_score", info.get("search_final"))
            diff = (f"{c.estimate:+.2f} [{c.low:+.2f}, {c.high:+.2f}]" if c.available else "–")
            lines.append(f"| {v.candidate} | {_settings_text(study['candidates'].get(v.candidate, {}))} | "
                         + (f"{searched_at:.2f} (`{info.get('trial')}`)" if searched_at is not None else "–")
                         + f" | {fmt(m, h)} (n={n}) | {diff} | "
                         + (f"{v.p_holm:.2g}" if math.isfinite(v.p_holm) else "–") + f" | {v.words} |")
            records.append({"candidate": v.candidate, "settings": study["candidates"].get(v.candidate, {}),
                            "search_final": searched_at, "confirm_mean": m, "confirm_ci95": h, "n": n,
                            "diff": c.estimate, "diff_low": c.low, "diff_high": c.high, "p": c.p,
                            "p_holm": v.p_holm, "verdict": v.words, "endpoint": endpoint.label})
        baseline = {"confirm_mean": mean_ci(list(by_candidate.get(BASELINE, {}).values())),
                    "search": [v for v in base_search.values() if math.isfinite(v)],
                    "report": record.get("baseline_search_report")}
        lines += [""] + self._plain_words(records, key, baseline)
        files = []
        if found:
            files.append(paired_figure(by_candidate, found, key, ctx.out / "confirm.png",
                                       f"{ctx.plan.name}: each candidate − baseline, per seed (paired)"))
            lines += ["", "![confirm.png](confirm.png)"]
        return SectionOutput(lines, files + ([str(record_path)] if record_path.is_file() else []),
                             {"confirmation": records})

    @staticmethod
    def _plain_words(records: list[dict[str, Any]], key: str, baseline: Mapping[str, Any] | None = None) -> list[str]:
        if not records:
            return ["No candidate has a finished trial to compare."]
        best = records[0]
        out = []
        better = [r["candidate"] for r in records if r["verdict"].startswith("better")]
        out.append("- " + (f"Better than the baseline on fresh seeds: {', '.join(better)}." if better else
                           "No candidate is better than the baseline on fresh seeds at this number of seeds."))
        if best["search_final"] is not None and math.isfinite(best["confirm_mean"]):
            out += gap_words(best["search_final"], best["confirm_mean"], (baseline or {}).get("search") or [],
                             (baseline or {}).get("confirm_mean", (math.nan, math.nan, 0)), key)
        widths = [r["diff_high"] - r["diff_low"] for r in records if math.isfinite(r["diff_high"])]
        if widths:
            out.append(f"- The paired intervals are {min(widths):.1f}–{max(widths):.1f} {short(key)} wide: a "
                       "difference much smaller than that cannot be told from zero with these seeds.")
        return out


def gap_words(search: float, confirmed: float, baseline_search: Sequence[float],
              baseline_confirmed: tuple[float, float, int], key: str) -> list[str]:
    """The search's best scored `search` on its seed(s) and averages `confirmed` on the fresh ones.
    With the baseline on the search seeds too, that gap is split: the seed effect (the baseline's
    own change between the two sets of seeds) and the winner's own drop (the rest: the change of
    its lead over the baseline); each is worded from its sign and size, in the metric's direction."""
    gap = confirmed - search
    first = (f"- The search's best (best1) scored {search:.2f} on its search seed; on the confirmation seeds it "
             f"averages {confirmed:.2f} ({gap:+.2f}).")
    base_mean, base_half, base_n = baseline_confirmed
    if not baseline_search or not math.isfinite(base_mean):
        curse = (f" The baseline did not run on the search seed, so this gap mixes selection (the winner's curse: "
                 f"its search score was chosen for being {words(key)[0][:-2]}) with the difference between the seeds; "
                 "the two cannot be told apart here." if better_than(search, confirmed, key) else "")
        return [first + curse]
    seed_effect = base_mean - float(np.mean(baseline_search))
    own = gap - seed_effect
    lead_search = search - float(np.mean(baseline_search))
    lead_confirmed = confirmed - base_mean
    within = (f" ±{base_half:.2f}" if math.isfinite(base_half) else "") + f" (the baseline's 95% interval, n={base_n})"
    split = (f"- Split of that gap: the baseline itself scored {float(np.mean(baseline_search)):.2f} on the search "
             f"seed and {base_mean:.2f} on the confirmation seeds, a seed effect of {seed_effect:+.2f}{within}; the "
             f"rest, {own:+.2f}, is best1's own {'drop' if better_than(0.0, own, key) else 'change'}: its difference "
             f"from the baseline went from {lead_search:+.2f} on the search seed to {lead_confirmed:+.2f} on fresh "
             "seeds.")
    lost = better_than(0.0, own, key)                     # its lead over the baseline shrank
    if not lost:
        reading = "best1 kept its lead over the baseline: no sign of the winner's curse; the gap is the seeds."
    elif abs(seed_effect) > abs(own):
        side = words(key)[1] if better_than(0.0, seed_effect, key) else words(key)[0]
        reading = (f"most of the gap is the seeds (the baseline itself scores {side} on the confirmation seeds); "
                   "the winner's curse accounts for the smaller part.")
    else:
        reading = ("most of the gap is the winner's curse: best1's search score owed more to its seed than the "
                   "baseline's did.")
    return [first, split + " " + reading[0].upper() + reading[1:]]


def paired_figure(by_candidate: Mapping[str, Mapping[int, float]], found: Sequence[Verdict], key: str, path: Path,
                  title: str) -> str:
    """Per candidate: each seed's difference from the baseline (dots) and the mean with its 95%
    interval (a bar); the zero line is "no difference"."""
    plt = pyplot()
    base = by_candidate.get(BASELINE, {})
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(found), 4))
    rng = np.random.default_rng(0)
    for i, v in enumerate(found):
        mine = by_candidate[v.candidate]
        diffs = [mine[s] - base[s] for s in sorted(mine) if s in base
                 and math.isfinite(mine[s]) and math.isfinite(base[s])]
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(diffs)), diffs, color="tab:blue", s=22, alpha=0.8, zorder=3)
        c = v.comparison
        if c.available:
            colour = "tab:green" if v.words.startswith("better") else "tab:red" if v.words.startswith("worse") \
                else "tab:grey"
            ax.errorbar([i + 0.25], [c.estimate], yerr=[[c.estimate - c.low], [c.high - c.estimate]], fmt="o",
                        color=colour, capsize=4, linewidth=1.8)
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(found)), [v.candidate for v in found])
    ax.set_xlim(-0.5, len(found) - 0.3)
    ax.set_ylabel(f"final {short(key)}: candidate − baseline ({words(key)[0]} is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
