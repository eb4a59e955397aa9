"""How a study decides, as every part of it that compares trials reads it: the endpoint that
scores each trial (ayt/studies/protocols/endpoint.py) and the level its comparisons are made at.

A study that runs its seeds in rounds (ayt/studies/protocols/seed_rounds.py) looks at its comparisons
after every round and stops at the first decisive one, so it decides at 95% split over its
planned looks (Bonferroni); its report's intervals and p are at that level too, or the report
would print a "decided" interval that excludes 0 in more than 5% of studies with no effect
(6.7% with 2 looks, simulated). Kept apart from seed_rounds (which is also a report section)
so the group table can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ayt.studies.protocols import endpoint as endpoints
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.report.stats import LEVEL, decision_level


def rounds_enabled(study: Mapping[str, Any]) -> bool:
    """Whether the study runs its seeds in rounds (never a tuning stage: it has no reference)."""
    stage = (study.get("protocol") or {}).get("stage")
    return (study.get("seed_rounds") or {}).get("first") is not None and stage != "tune"


def schedule(study: Mapping[str, Any], seeds: Sequence[int]) -> list[tuple[int, ...]]:
    """The seeds each round adds: `first`, then `step` more, until every seed is used."""
    rounds = study["seed_rounds"]
    first, step = int(rounds["first"]), int(rounds["step"])
    out, used = [tuple(seeds[:first])], first
    while used < len(seeds):
        out.append(tuple(seeds[used:used + step]))
        used += step
    return out


@dataclass(frozen=True)
class Decision:
    endpoint: Endpoint
    looks: int = 1               # planned looks at each comparison (seed rounds: one per round)

    @property
    def level(self) -> float:
        return decision_level(self.looks, LEVEL)

    def words(self) -> str:
        """"at last_3 (the mean of the last 3 evaluations)" (+ the level when it is not 95%)."""
        level = (f"; comparisons at {self.level:.1%}, 95% split over {self.looks} looks of the seed rounds"
                 if self.looks > 1 else "")
        return f"endpoint `{self.endpoint.label}` ({self.endpoint.words}){level}"


def of(study: Mapping[str, Any]) -> Decision:
    """The study block's endpoint and looks (its listed seeds split into rounds)."""
    looks = len(schedule(study, list(study.get("seeds") or []))) if rounds_enabled(study) else 1
    return Decision(endpoints.of(study), looks)
