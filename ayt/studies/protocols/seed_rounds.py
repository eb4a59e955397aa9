"""Seeds until decisive: a study runs its seeds in rounds and adds a round only
while a comparison it names is still inconclusive.

With `study.seed_rounds.first=3, step=2` and `study.seeds=[0..9]`, round 0 runs seeds 0-2,
then each named group (`compare`, or every group that has a reference) is compared with its
reference (`study.target.reference`), its metric at the study's endpoint paired by seed. If any
is inconclusive and seeds are left, round 1 adds seeds 3-4, and so on up to every seed listed
(the cap).

Looking after every round and stopping at the first significant result would make "better"
more likely than the 5% a single test allows, so the rounds decide at a level split over the
planned looks (Bonferroni: 0.05 / looks), which keeps the chance of any false decision at 5%.
The report's tables and findings state their intervals and p at that level too
(ayt/studies/protocols/decision.py); the Seed rounds section states the rule, how many seeds each
comparison used and why it stopped.

Each round is an ordinary study on the shared runner under the study's one MLflow parent run
(round 0 is the study itself, round k its Tune experiment `<study id>-r<k>`), so a resumed
study restores the finished rounds (nothing reruns, no MLflow run is duplicated), decides
again from the same trials, and goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ayt.eval.metrics import direction
from ayt.errors import ConfigError
from ayt.studies.protocols import decision as decisions
from ayt.studies.protocols.decision import rounds_enabled as enabled, schedule  # noqa: F401  (declared there)
from ayt.studies.engine.group import Group
from ayt.studies.protocols.tune_then_repeat import parse_group_label
from ayt.studies.report.section import ReportContext, Section, SectionOutput
from ayt.studies.report.stats import Comparison, paired

ROUNDS_FILE = "seed_rounds.json"


def check(study: Mapping[str, Any], space: Any) -> None:
    """What relates `study.seed_rounds` to the rest of the study, before any work (each field's
    own bounds are the schema's): one line naming the field."""
    if not enabled(study):
        return
    where = "study.seed_rounds"
    first, seeds = int(study["seed_rounds"]["first"]), list(space.seeds)
    if first >= len(seeds):
        raise ConfigError(f"{where}.first", f"{first} seeds in the first round leaves no round to add: list more "
                          f"seeds in study.seeds (the cap, now {len(seeds)}) or lower it")
    if space.search != "grid":
        raise ConfigError(where, f"seed rounds repeat the groups of a grid; got study.search={space.search}")
    if str(study["protocol"]["name"]) == "search_then_confirm":
        raise ConfigError(where, "search_then_confirm compares on its own confirmation seeds; use seed rounds on a "
                          "grid study with a reference")
    reference = (study.get("target") or {}).get("reference")
    if not reference:
        raise ConfigError(where, "seed rounds decide on each group's comparison with its reference: set "
                          "study.target.reference, e.g. {loss: pseudo_huber}")
    for label in study["seed_rounds"]["compare"] or []:
        try:
            wanted = parse_group_label(space, label)
        except ConfigError as err:
            raise ConfigError(f"{where}.compare", err.message) from None
        if all(str(reference.get(k)) == v for k, v in wanted.items() if k in reference) and \
                set(reference) <= set(wanted):
            raise ConfigError(f"{where}.compare", f"{label} is the reference group itself; name the groups "
                              "compared with it")


def round_plan(plan: Any, index: int, seeds: Sequence[int]) -> Any:
    """Round `index` of the study: its seeds, and (after round 0) a Tune experiment and Optuna
    study of its own under the same MLflow parent."""
    study_id = plan.study_id if index == 0 else f"{plan.study_id}-r{index}"
    return dataclasses.replace(plan, study_id=study_id, space=dataclasses.replace(plan.space, seeds=list(seeds)))


@dataclass(frozen=True)
class Decision:
    group: str
    seeds: int
    comparison: Comparison
    decisive: bool


def decide(trials: Sequence[Any], study: Mapping[str, Any], space: Any, key: str, looks: int) -> list[Decision]:
    """Each compared group against its reference, `key` at the study's endpoint paired by seed,
    at 95% split over `looks`."""
    reference = {k: str(v) for k, v in study["target"]["reference"].items()}
    names = [parse_group_label(space, label) for label in study["seed_rounds"]["compare"] or []]
    endpoint = decisions.of(study).endpoint
    by_group: dict[Group, dict[str, float]] = {}
    for t in trials:
        if t.status == "FINISHED":
            by_group.setdefault(t.group, {})[t.seed] = t.score(key, endpoint)
    out = []
    for group, finals in by_group.items():
        ref = group.replace(reference)
        if ref == group or ref not in by_group:
            continue
        if names and not any(group.matches(n) for n in names):
            continue
        c = paired(finals, by_group[ref], looks=looks, direction=direction(key))
        out.append(Decision(group.label, c.n, c, c.significant))
    return out


def run_in_rounds(plan: Any, fit: Callable[[Any], list], load: Callable[[], list], key: str) -> list:
    """Run the study's rounds through `fit` (one round's plan -> its Tune results) until every
    named comparison is decisive or the seeds run out; `load` gives the trials so far. Writes
    the record the report's section reads, and returns every round's results."""
    rounds = schedule(plan.study, plan.space.seeds)
    looks = len(rounds)
    results, used, record = [], [], []
    for index, seeds in enumerate(rounds):
        used += seeds
        results += fit(round_plan(plan, index, seeds))
        found = decide(load(), plan.study, plan.space, key, looks)
        open_ = [d.group for d in found if not d.decisive]
        record.append({"round": index, "seeds": list(seeds), "open": open_,
                       "decisions": [{"group": d.group, "seeds": d.seeds, "decisive": d.decisive,
                                      "outcome": d.comparison.outcome, "estimate": d.comparison.estimate,
                                      "low": d.comparison.low, "high": d.comparison.high,
                                      "p": d.comparison.p} for d in found]})
        if not found or not open_:
            break
    last = record[-1]
    reason = ("no comparison with a reference had finished trials" if not last["decisions"] else
              "every named comparison decisive" if not last["open"] else
              f"seed cap reached ({len(plan.space.seeds)} seeds listed) with {', '.join(last['open'])} still open")
    write_record(plan.out_dir / ROUNDS_FILE, {"level": decisions.of(plan.study).level, "looks": looks,
                                             "endpoint": decisions.of(plan.study).endpoint.label,
                                             "seeds_used": used, "rounds": record, "stopped": reason})
    return results


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=float))


class SeedRoundsSection(Section):
    """How many seeds each comparison used, at which level it decided, and why the rounds stopped."""

    def applies(self, ctx: ReportContext) -> bool:
        return enabled(ctx.plan.study) and (ctx.out / ROUNDS_FILE).is_file()

    def write(self, ctx: ReportContext) -> SectionOutput:
        record = json.loads((ctx.out / ROUNDS_FILE).read_text())
        looks, level = record["looks"], record["level"]
        endpoint = record.get("endpoint", "final")      # a record from before study.endpoint: the final evaluation
        lines = ["## Seed rounds", "",
                 f"Seeds were added in rounds ({', '.join(str(len(r['seeds'])) for r in record['rounds'])} seeds) "
                 f"while a named comparison was inconclusive at endpoint `{endpoint}`. Each round decides at the "
                 f"{level:.1%} level (95% split over the {looks} planned looks, Bonferroni), so stopping at the first "
                 f"decisive round keeps the chance of any false decision at 5%; the comparisons above state their "
                 f"intervals at {level:.1%} and their p multiplied by {looks} for the same reason.",
                 "", f"Stopped after round {record['rounds'][-1]['round']}: {record['stopped']}.", "",
                 f"| group vs reference | seeds | outcome at the rounds' level | estimate [{level:.1%} interval] | "
                 f"p ×{looks} looks |", "|---|---|---|---|---|"]
        for d in record["rounds"][-1]["decisions"]:
            outcome = d["outcome"] if d["decisive"] else "inconclusive"
            estimate = f"{d['estimate']:+.3g}" if math.isfinite(d["estimate"]) else "–"
            if math.isfinite(d.get("low", math.nan)) and math.isfinite(d.get("high", math.nan)):
                estimate += f" [{d['low']:+.3g}, {d['high']:+.3g}]"
            p = f"{min(1.0, d['p'] * looks):.2g}" if math.isfinite(d["p"]) else "–"
            lines.append(f"| {d['group']} | {d['seeds']} | {outcome} | {estimate} | {p} |")
        return SectionOutput(lines + [""], [str(ctx.out / ROUNDS_FILE)], {"seed_rounds": record})
