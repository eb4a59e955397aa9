"""Hydra's configs ship inside the package (`ayt.conf`): they compose from the editable
install the tests run on and from a built wheel installed somewhere else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ayt

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import ayt, sys
from ayt.config import load_config
cfg = load_config(["experiment=smoke", "loss=pseudo_huber", "out_dir=" + sys.argv[1]])
print(ayt.__file__)
print(cfg.loss.name, cfg.batch_size, cfg.training.iterations)
"""


def test_editable_install_finds_conf(tmp_path):
    from ayt.config import load_config
    cfg = load_config(["experiment=smoke", f"out_dir={tmp_path}"])
    assert Path(ayt.__file__).resolve().is_relative_to(REPO)
    assert cfg.training.iterations == 150 and cfg.loss.name == "mfd"


def test_built_wheel_carries_conf_and_composes(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("ayt-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    assert (target / "ayt" / "conf" / "config.yaml").exists()
    assert (target / "ayt" / "conf" / "experiment" / "smoke.yaml").exists()
    # Every package of the source tree ships (pyproject lists them by hand).
    source = {p.parent.relative_to(REPO) for p in (REPO / "ayt").rglob("__init__.py")}
    assert not [str(p) for p in source if not (target / p / "__init__.py").exists()]
    # PYTHONPATH puts the wheel's copy ahead of the editable install; run from another directory.
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "out")], cwd=elsewhere, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    where, values = out.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(target.resolve())
    assert values.split() == ["pseudo_huber", "32", "150"]
