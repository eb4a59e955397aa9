"""The package's import structure, read statically (`ayt.import_graph`, ast over every module,
module-level and function-level imports alike): no import circles; the config layer imports
nothing from training; every artifact kind's cache is keyed by every module its builder runs.

Mutations caught: a lazy `from ayt.studies.report.write import ...` back in report_tangent (a
circle: printed as report -> report_tangent -> report); `from ayt.training.converged import ...`
in ayt/config.py (fails (b), and (a) through converged -> config); an artifact kind whose
source list is kept by hand and misses an import of its builder: the old hand-kept list,
whose `converged` entry named training/step.py but not training/noise_scale.py that step.py
imports (fails (c), naming the missing modules).
"""

from __future__ import annotations

import importlib

import pytest

from ayt import import_graph
from ayt.artifacts import ARTIFACT_KINDS, ARTIFACT_SOURCES, artifact_sources


def _static_closure(root: str) -> set[str]:
    """Every module `root` imports, transitively, through import statements only."""
    edges = import_graph.graph()
    seen, pending = set(), [root]
    while pending:
        for target in edges.get(pending.pop(), ()):
            if target not in seen:
                seen.add(target)
                pending.append(target)
    return seen


def test_every_module_parses_and_the_graph_sees_lazy_imports():
    modules = import_graph.package_modules()
    assert {"ayt", "ayt.config", "ayt.training.loop", "ayt.studies.report.write"} <= set(modules)
    # a function-level import is an edge like any other (the converged checks import the losses lazily)
    assert any(target == "ayt.method.losses" and inside for target, _, inside in import_graph.imports("ayt.startup"))
    assert "ayt.method.losses" in import_graph.graph(modules)["ayt.startup"]


def test_the_package_has_no_import_circles():
    circles = import_graph.cycles(import_graph.graph())
    assert not circles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in circles)


def test_cycle_finder_prints_the_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert import_graph.cycles(edges) == [["a", "b", "c", "a"]]


def test_config_imports_nothing_from_training():
    reached = sorted(m for m in _static_closure("ayt.config") if m.startswith("ayt.training"))
    assert not reached, f"ayt.config reaches {reached}: register the check in a module outside ayt.training"


def _missing_sources(sources: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """Per kind, the modules its builder (and the kinds it is built from) run that `sources` lacks."""
    missing = {}
    for kind in ARTIFACT_KINDS.values():
        needed = set(import_graph.closure([kind.builder().__module__]))
        for used in kind.uses:
            needed |= set(import_graph.closure([ARTIFACT_KINDS[used].builder().__module__]))
        lacking = sorted(needed - set(sources.get(kind.name, ())))
        if lacking:
            missing[kind.name] = lacking
    return missing


def test_every_artifact_kind_is_keyed_by_every_module_its_builder_runs():
    sources = {kind: artifact_sources(kind) for kind in ARTIFACT_KINDS}
    assert not _missing_sources(sources)
    assert "ayt.training.noise_scale" in sources["converged"]         # imported by step.py's diagnostics
    assert "ayt.training.pretrain" in sources["converged"]            # built from the pretrained denoiser
    assert "ayt.method.augment" in sources["feature_map"]


# The list ayt/artifacts.py kept by hand until the kinds were registered (commit 342a93a).
_DENOISER = ("ayt.data", "ayt.networks.unet", "ayt.networks.precond")
HAND_KEPT = {
    "pretrained": _DENOISER + ("ayt.training.pretrain",),
    "init_file": _DENOISER,
    "feature_map": ("ayt.data", "ayt.method.augment", "ayt.networks.feature_map", "ayt.training.feature_map",
                    "ayt.training.alignment", "ayt.method.losses"),
    "fid_classifier": ("ayt.data", "ayt.eval.classifier"),
    "converged": _DENOISER + ("ayt.training.pretrain", "ayt.training.converged", "ayt.training.loop",
                              "ayt.training.step", "ayt.method.losses", "ayt.method.schedule", "ayt.method.ema"),
}


def test_the_old_hand_kept_list_fails_the_check(monkeypatch):
    for kind, modules in HAND_KEPT.items():
        monkeypatch.setitem(ARTIFACT_SOURCES, kind, modules)
    missing = _missing_sources({kind: artifact_sources(kind) for kind in ARTIFACT_KINDS})
    assert "ayt.training.noise_scale" in missing["converged"]
    assert "ayt.method.ema" in missing["pretrained"]        # pretrain.py's EMA was missing too


@pytest.mark.parametrize("kind", sorted(ARTIFACT_KINDS))
def test_every_builder_resolves(kind):
    declared = ARTIFACT_KINDS[kind]
    assert callable(declared.builder()) and declared.builder().__module__ == declared.module


def test_evaluation_imports_nothing_from_training():
    """Training calls evaluation (the loop builds `ayt.eval.probe.EvalProbe`), never the other
    way round: no `ayt.eval` module reaches `ayt.training`, lazily or not.

    Mutation caught: `from ayt.training.step import unwrap` back inside TangentProbe.__call__."""
    for module in (m for m in import_graph.package_modules() if m.startswith("ayt.eval")):
        reached = sorted(m for m in _static_closure(module) if m.startswith("ayt.training"))
        assert not reached, f"{module} reaches {reached}: move what it needs below ayt.training"


def test_a_study_pickled_under_the_flat_layout_still_unpickles():
    """Tune and Optuna pickle a running study's plan, trainable and callbacks by module name:
    an object named by its module before ayt.studies was split into engine/protocols/report
    loads as the object now there. Mutation caught: dropping the old names (resume fails)."""
    import pickle

    from ayt.studies import MOVED
    from ayt.studies.engine.plan import StudyPlan
    from ayt.studies.engine.tune_backend import run_trial
    assert pickle.loads(b"cayt.studies.tune_backend\nrun_trial\n.") is run_trial
    assert pickle.loads(b"cayt.studies.plan\nStudyPlan\n.") is StudyPlan
    for old, new in MOVED.items():
        assert importlib.import_module(f"ayt.studies.{new}"), old
