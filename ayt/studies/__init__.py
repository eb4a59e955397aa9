"""Studies: Ray Tune + Optuna sweeps on a shared runner, tracked in MLflow.

The study modules (`python -m ayt.studies.<name>`, one per conf/study/<name>.yaml) sit here;
the parts they share sit in three rooms:

- `engine`: the plan (schema, space, plan), the Tune back-end, resume, the MLflow tracker,
  the console and the command line;
- `protocols`: how groups are compared and decided (tune_then_repeat, search_then_confirm,
  seed rounds, the seed plan, the endpoint and the decision level);
- `report`: the report's sections, tables, plots and statistics.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Where modules of the flat layout went. Tune and Optuna pickle the objects of a running study
# (its plan, trainable, callbacks) by module name: a study started before the move still
# resumes, since each old name loads as a view of the module that replaced it.
MOVED = {
    **{m: f"engine.{m}" for m in ("cli", "console", "plan", "resume", "sampler", "schema", "space", "tracker",
                                  "tune_backend", "group", "trials")},
    "protocol": "protocols.tune_then_repeat", "confirm": "protocols.search_then_confirm",
    **{m: f"protocols.{m}" for m in ("seed_rounds", "seed_plan", "decision", "endpoint")},
    "report_limits": "report.limits", "report_plots": "report.plots", "report_rows": "report.rows",
    "report_search": "report.search", "report_section": "report.section", "report_table": "report.table",
    "report_tangent": "report.tangent", "stats": "report.stats", "critical_batch": "report.critical_batch",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`ayt.studies.<old>` imports as a module holding the same objects as its new home."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, leaf = fullname.rpartition(".")
        if prefix == __name__ and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new = importlib.import_module(f"{__name__}.{MOVED[module.__name__.rpartition('.')[2]]}")
        module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
