"""One declaration per option: the protocol stages the runtime uses are the schema's
dataclasses (one default each), the path keys are listed once, and the study's artifact
prebuild asks the artifact kinds which artifacts a trial needs. No Ray."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from ayt.config import PATH_FIELDS, load_config
from ayt.preflight import FILE_FIELDS, PreflightError, check_locations
from ayt.studies.protocols import search_then_confirm as confirm
from ayt.studies.protocols import tune_then_repeat as protocol
from ayt.studies.engine import schema
from ayt.studies.engine.plan import plan_study

TTR = ["study.protocol.name=tune_then_repeat", "study.protocol.tune.seeds=[1000,1001]"]


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def test_the_protocol_stages_are_the_schemas_with_one_default_each(tmp_path):
    """`max_extensions` defaulted to 2 in the schema and 0 in the runtime's own TuneStage.
    Mutation caught: a runtime default of its own (parse_tune_stage's `.get(key, 0)`)."""
    assert protocol.TuneStage is schema.TuneStage and confirm.ConfirmStage is schema.ConfirmStage
    plan = plan_study("speed", [f"out_dir={tmp_path}", *TTR])
    stage = protocol.parse_tune_stage(plan.study, plan.space)
    assert isinstance(stage, schema.TuneStage) and stage.max_extensions == _default(schema.TuneStage, "max_extensions")
    written = {**plan.study, "protocol": {**plan.study["protocol"], "tune": {
        k: v for k, v in plan.study["protocol"]["tune"].items() if k not in ("max_extensions", "allow_one_seed")}}}
    left_out = protocol.parse_tune_stage(written, plan.space)      # a block without them: the schema's defaults
    assert left_out.max_extensions == _default(schema.TuneStage, "max_extensions") == 2
    assert left_out.allow_one_seed is _default(schema.TuneStage, "allow_one_seed")
    search = plan_study("huber_sweep", [f"out_dir={tmp_path}"])
    found = confirm.parse_confirm(search.study, search.space)
    assert isinstance(found, schema.ConfirmStage) and found.k == 3 and list(found.seeds) == [100, 101, 102, 103, 104]


def test_every_file_a_config_names_is_checked_before_any_work(tmp_path):
    """The files preflight checks are the path fields declared as files (fid.reference_stats
    was made absolute but not in preflight's own list)."""
    assert set(FILE_FIELDS) == {key for key, kind in PATH_FIELDS.items() if kind == "file"}
    assert "fid.reference_stats" in FILE_FIELDS and "dataset.root" not in FILE_FIELDS
    cfg = load_config([f"out_dir={tmp_path}"])
    for key in FILE_FIELDS:
        broken = OmegaConf.merge(cfg, {})
        OmegaConf.update(broken, key, str(tmp_path / "missing.pt"), force_add=True)   # lpips' keys: not in mfd
        with pytest.raises(PreflightError) as info:
            check_locations(broken, uses_ray=False)
        assert info.value.field == key


def test_the_prebuild_builds_each_distinct_set_of_artifacts_the_kinds_name_once(tmp_path, monkeypatch):
    """Two trials that differ only in the converged start they fine-tune from need two builds:
    the prebuild's own list (pretrained, feature map, classifier) saw one. Its builds are
    recorded here instead of run (what is built is the artifact layer's own tests' matter)."""
    from ayt.studies.engine.tune_backend import prebuild_artifacts
    from ayt.training import prepare
    built = []
    monkeypatch.setattr(prepare, "ensure_artifacts", lambda cfg, progress=True: built.append(cfg))
    plan = plan_study("finetune", [f"out_dir={tmp_path}"])
    first = plan.trial_configs[0]
    other = OmegaConf.merge(first, {"converged": {"lr": float(first.converged.lr) * 2}})
    same = OmegaConf.merge(first, {"seed": int(first.seed) + 7})           # no artifact reads the trial seed
    plan.trial_configs = [first, same, other]
    assert prebuild_artifacts(plan, progress=False) == 2 and len(built) == 2
