"""What a part of the study report is: a `Section` says when it applies and what it writes
(`SectionOutput`: markdown lines, files, records for the summary `write_report` returns), from
the `ReportContext` every section reads: the plan, the trials (loaded once, every history),
where files go, and what more than one section needs (targets, the group table's rows).

The report is `ayt.studies.report.write.SECTIONS`, a list of sections in the order report.md shows
them; a new section is one subclass and its entry there, e.g.

    class LossCurves(Section):
        '''train/loss against images seen, per group: seeds thin, their mean bold.'''

        def applies(self, ctx):
            return any(t.curves.get(LOSS) for t in ctx.trials)

        def write(self, ctx):
            path = curve_figure(ctx.trials, LOSS, ctx.out / "loss.png", title=f"{ctx.plan.name}: train/loss",
                                ylabel="loss")
            return SectionOutput(files=[path])      # before Figures in SECTIONS: listed under "## Figures"

Every history a trial logged is in `t.curves` (`ayt.studies.engine.trials`): a section reads the
metrics it shows, and nothing else has to name them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ayt.studies.protocols import decision as decisions
from ayt.studies.protocols.decision import Decision
from ayt.studies.engine.group import Group
from ayt.studies.report.table import group_rows, targets
from ayt.studies.engine.trials import Trial


@dataclass
class SectionOutput:
    lines: list[str] = field(default_factory=list)          # markdown, each section bringing its blank lines
    files: list[str] = field(default_factory=list)          # paths written (logged to the parent run)
    records: dict[str, Any] = field(default_factory=dict)   # merged into the summary write_report returns


@dataclass
class ReportContext:
    plan: Any                                   # the StudyPlan
    trials: list[Trial]
    out: Path                                   # out_dir/<study>/
    started_ms: int | None = None               # the study's parent run start (its wall-clock)
    ended_ms: int | None = None                 # its end, when it has ended (a report rewritten later)
    outputs: list[tuple["Section", SectionOutput]] = field(default_factory=list)   # the sections written so far

    @property
    def decision(self) -> Decision:
        """The study's endpoint and the level its comparisons are made at (ayt/studies/protocols/decision.py)."""
        return decisions.of(self.plan.study)

    @property
    def key(self) -> str:
        """The study metric, as trials log it (`eval/fid_1step`)."""
        return self.plan.metric

    @property
    def groups(self) -> list[Group]:
        """The trials' groups in report order."""
        return list(dict.fromkeys(t.group for t in self.trials))

    @functools.cached_property
    def targets(self) -> dict[Group, float | None]:
        """Target FID per group (`study.target`)."""
        return targets(self.trials, self.plan.study, self.key)

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The group table: one row per group with its statistics and comparison records."""
        return group_rows(self.trials, self.targets, self.key, self.plan.study)


class Section:
    """One part of the report; subclasses override `write` and, if it may not apply, `applies`."""

    def applies(self, ctx: ReportContext) -> bool:
        return True

    def write(self, ctx: ReportContext) -> SectionOutput:
        raise NotImplementedError
