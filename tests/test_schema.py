"""The study schema (ayt/studies/engine/schema.py) is the one place a study key is declared: its
type, default, check, and whether it is part of the study's identity. What is derived from
it (the volatile keys, the usage text, each field's check) follows a change to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ayt.errors import ConfigError
from ayt.studies.engine import schema
from ayt.studies.runner import plan_study, study_main

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_says_what_it_is_for_and_the_usage_lists_it():
    infos = list(schema.fields())
    assert len(infos) > 25
    text = schema.usage()
    for info in infos:
        assert info.meta.get("doc"), f"study.{info.path} has no doc"
        if not info.meta.get("internal"):
            assert f"study.{info.path}" in text, info.path


def test_base_yaml_only_extends_the_schema():
    """Defaults live once, in the schema: conf/study/base.yaml sets no study key itself."""
    base = yaml.safe_load((ROOT / "conf" / "study" / "base.yaml").read_text())
    assert set(base) == {"defaults"} and "schema" in base["defaults"]


@pytest.mark.parametrize("override", ["study.max_concurrent_trials=3", "study.max_failures=4",
                                      "study.trial_backend=ray_train", "study.allow_code_change=true",
                                      "study.tuned_source=elsewhere", "study.critical_batch.target=per_series",
                                      "study.resume=true"])
def test_a_volatile_field_leaves_the_study_id_alone(tmp_path, override):
    base = plan_study("batch_size_sweep", [f"out_dir={tmp_path}"]).study_id
    assert plan_study("batch_size_sweep", [f"out_dir={tmp_path}", override]).study_id == base


@pytest.mark.parametrize("override", ["study.sampler_seed=3", "study.budget.evals=2", "study.seeds=[0,1]",
                                      "study.asha.reduction_factor=3"])
def test_a_defining_field_changes_the_study_id(tmp_path, override):
    base = plan_study("batch_size_sweep", [f"out_dir={tmp_path}"]).study_id
    assert plan_study("batch_size_sweep", [f"out_dir={tmp_path}", override]).study_id != base


def test_volatile_keys_are_derived_from_the_declarations():
    declared = {f.name for f in dataclasses.fields(schema.StudySchema) if not f.metadata["defines"]}
    assert set(schema.volatile_keys()) == declared and "resume" in declared and "axes" not in declared


@pytest.mark.parametrize("override, field, words", [
    ("+study.not_a_field=1", "study.not_a_field", "not a study key"),
    ("+study.budget.per_gpu=1", "study.budget.per_gpu", "not a study key"),
    ("study.budget.amount=abc", "study.budget.amount", "could not be converted"),
    ("study.budjet=1", "study.budjet", "did you mean `study.budget`"),
    ("study.metric=fid_10step", "study.metric", "allowed: fid_1step, fid_2step"),
    ("study.asha.reduction_factor=1", "study.asha.reduction_factor", "> 1"),
    ("study.max_failures=-1", "study.max_failures", ">= 0"),
    ("study.protocol.tune.points=0", "study.protocol.tune.points", ">= 1"),
    ("study.trial_backend=threads", "study.trial_backend", "allowed: auto, in_process, ray_train"),
])
def test_a_bad_field_is_one_line_naming_it(tmp_path, capsys, override, field, words):
    assert study_main("batch_size_sweep", [f"out_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and words in err[0], err


def test_validate_reads_the_declared_checks():
    """Mutation caught: a check on a field's metadata that validate() ignores."""
    ok = {"budget": {"amount": 10, "evals": 2, "unit": "images"}}
    schema.validate(ok)
    with pytest.raises(ConfigError, match="study.budget.unit"):
        schema.validate({"budget": {"unit": "epochs"}})
    with pytest.raises(ConfigError, match="study.protocol.tune.seeds"):
        schema.validate({"protocol": {"tune": {"seeds": []}}})
