"""The study command line. `python -m ayt.studies.<name>` (a study module) and
`python -m ayt.studies <name>` (ayt/studies/__main__.py) both run `study_main(name)`:
plan (ayt.studies.engine.plan), check every path, then run on Tune (ayt.studies.engine.tune_backend)."""

from __future__ import annotations

import logging
import sys
from importlib.resources import files
from typing import Sequence

from omegaconf import OmegaConf

from ayt.config import CONFIG_MODULE
from ayt.errors import ConfigError

USAGE = """usage: python -m ayt.studies.{name} [--cfg | --plan | --report] [resume=true] [study.KEY=VALUE ...] [TRAIN_OVERRIDE ...]
   or: python -m ayt.studies {name} [--cfg | --plan | --report] [resume=true] [study.KEY=VALUE ...] [TRAIN_OVERRIDE ...]

--cfg makes every check the study makes before its first trial, prints the plan (the trials of
every stage) and its seed plan, and runs nothing; --plan prints only the seed plan: the seeds
its comparisons need to detect study.detect at study.endpoint, from study.pilot, and their cost
(ayt/studies/protocols/seed_plan.py); --report writes the reports of a study that has run again from its
MLflow runs (nothing trains).

Any key=value that is not study.* applies to every trial (e.g. out_dir=/tmp/ayt scaling.num_workers=2).
Study keys (conf/study/{name}.yaml sets what makes that study; ayt/studies/engine/schema.py declares them):"""


def usage(name: str) -> str:
    """The usage header and one line per study key, from the schema."""
    from ayt.studies.engine.schema import usage as study_keys
    return USAGE.format(name=name) + "\n" + study_keys()


def study_names() -> list[str]:
    """The studies a user can name: every conf/study/<name>.yaml but base (what they share)."""
    found = files(CONFIG_MODULE).joinpath("study").iterdir()
    return sorted(p.name[:-len(".yaml")] for p in found if p.name.endswith(".yaml") and p.name != "base.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ayt.studies <name> [overrides]`: the study is the first argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    names = study_names()
    if not args or args[0] in ("-h", "--help"):
        text = usage("STUDY") + "\n\nSTUDY (conf/study/STUDY.yaml): " + ", ".join(names)
        print(text, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in names:
        print(f"ayt: config error: study: unknown study {name!r}; allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    return study_main(name, rest)


def study_main(name: str, argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage(name))
        return 0
    # Imported here, not above: help and a wrong study name answer without loading torch.
    from ayt.config import print_dry_run
    from ayt.preflight import check_locations
    from ayt.studies.engine.plan import plan_study, trial_count
    from ayt.studies.protocols.tune_then_repeat import protocol_name
    from ayt.studies.engine.sampler import search_notes
    from ayt.studies.engine.tune_backend import PROTOCOL_RUNNERS, StudyError, check_start, rewrite_reports
    dry_run, report_only, seeds_only = "--cfg" in args, "--report" in args, "--plan" in args
    args = [a for a in args if a not in ("--cfg", "--report", "--plan")]
    try:
        plan = plan_study(name, args)
        if report_only:
            for path in rewrite_reports(plan):
                print(f"ayt: report {path}")
            return 0
        # Everything the study checks before its first trial, dry run or not: every path and
        # address (before Ray or MLflow), then whether its first stage may start here.
        check_locations(plan.base)
        notes = [note for note in [check_start(plan.tune_plans[0] if plan.tune_plans else plan)] if note]
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    count = trial_count(plan)
    notes += search_notes(plan)
    from ayt.studies.protocols.seed_plan import plan_seeds
    if seeds_only:
        return print_dry_run("\n".join(plan_seeds(plan).lines()))
    if dry_run:
        for note in notes:
            print(f"ayt: note: {note}", file=sys.stderr)
        seed_plan = "".join(f"# {line}\n" for line in plan_seeds(plan).lines())     # YAML comments: it still parses
        return print_dry_run(OmegaConf.to_yaml({"study": plan.study, "study_id": plan.study_id,
                                                "trials": count.summary(), "base_overrides": plan.base_overrides})
                             + seed_plan)
    from ayt.logs import route_logs
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ayt").setLevel(logging.INFO)
    log_file = route_logs(plan.out_dir / "logs" / "study.log", verbose=bool(plan.base.get("verbose")))
    print(f"ayt: study {plan.study_id}: {count.words()}; Ray/Tune logs in {log_file}", flush=True)
    for note in notes:
        print(f"ayt: note: {note}", flush=True)
    try:
        summary = PROTOCOL_RUNNERS[protocol_name(plan.study)](plan, progress=bool(plan.base.progress))
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    except StudyError as err:
        print(f"ayt: study error: {err}", file=sys.stderr)
        return 1
    print(f"ayt: study {plan.study_id}: {summary['trials']} trials ({summary['errors']} failed); "
          f"report {summary['report']}; MLflow parent run {summary['parent_run_id']}")
    return 0 if summary["errors"] == 0 else 1
