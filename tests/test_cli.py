"""`python -m ayt.studies <name>`: the same study command as `python -m ayt.studies.<name>`
(a dry run prints the same plan), one line naming the allowed studies for a wrong name, and
a `--help` that lists every study in conf/study/. No Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ayt.studies.engine.cli import study_main

CONF_STUDY = Path(__file__).resolve().parents[1] / "conf" / "study"


def _studies(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ayt.studies", *args], capture_output=True, text=True, timeout=300)


def test_a_study_by_name_dry_runs_the_plan_its_module_prints(tmp_path, capsys):
    proc = _studies("batch_size_sweep", "--cfg", f"out_dir={tmp_path}", "study.seeds=[0,1]")
    assert proc.returncode == 0, proc.stderr
    assert study_main("batch_size_sweep", ["--cfg", f"out_dir={tmp_path}", "study.seeds=[0,1]"]) == 0
    assert proc.stdout == capsys.readouterr().out            # python -m ayt.studies.batch_size_sweep
    assert "study_id: batch_size_sweep-" in proc.stdout and "trials:\n  study: 16\n  total: 16\n" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()             # a dry run starts nothing


def test_an_unknown_study_is_one_line_naming_the_allowed_ones():
    proc = _studies("batch_sweep", "out_dir=/nonexistent")
    names = sorted(p.stem for p in CONF_STUDY.glob("*.yaml") if p.stem != "base")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "unknown study 'batch_sweep'" in line and line.endswith("allowed: " + ", ".join(names)), line


def test_help_lists_every_study_and_no_study_is_a_usage_error():
    helped = _studies("--help")
    names = sorted(p.stem for p in CONF_STUDY.glob("*.yaml") if p.stem != "base")
    assert helped.returncode == 0 and "python -m ayt.studies STUDY" in helped.stdout
    assert helped.stdout.strip().splitlines()[-1] == "STUDY (conf/study/STUDY.yaml): " + ", ".join(names)
    bare = _studies()
    assert bare.returncode == 2 and "usage: " in bare.stderr
