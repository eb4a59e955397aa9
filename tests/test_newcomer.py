"""A newcomer's first commands: the mistakes they make get one line in our words that says
what to type (exit code 2), and `--cfg` is a dry run that fails exactly where the real
command would, counts the trials of every stage, and survives `| head`. No Ray starts:
unreachable addresses are real unused ports on 127.0.0.1, unwritable paths real ones."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from ayt.studies.engine.cli import study_main
from ayt.studies.engine.plan import plan_study, trial_count
from ayt.train import main as train_main

UNWRITABLE = "/proc/ayt-cannot-write-here"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---- errors in our words -------------------------------------------------------------------

@pytest.mark.parametrize("entry, args, field, to_type", [
    ("train", ["los=mfd"], "los", "did you mean `loss`? (`loss=mfd`)"),
    ("train", ["--out_dir", "/tmp/x"], "out_dir", "type `out_dir=/tmp/x`"),
    ("study", ["study.seeds=0,1,2"], "study.seeds", "type `study.seeds=[0,1,2]`"),
    ("study", ["study.axes.lr=[1e-4,1e-3]"], "study.axes.lr", "type `+study.axes.lr=[1e-4,1e-3]`"),
    ("study", ["study.seedz=[0,1]"], "study.seedz", "did you mean `study.seeds`?"),
    ("train", ["training.log_everyy=5"], "training.log_everyy", "did you mean `training.log_every`"),
    ("study", ["study.protocol.name=search_then_confirm", "study.protocol.confirm.baseline={lr: 1e-3}"],
     "study.protocol.confirm.baseline", "type `+study.protocol.confirm.baseline={lr: 1e-3}`"),
])
def test_a_newcomers_mistake_is_one_line_saying_what_to_type(tmp_path, capsys, entry, args, field, to_type):
    """Mutations caught: dropping `check_overrides` (Hydra's "LexerNoViableAltException" and
    "Ambiguous value"), or `_unknown_key` ("Key 'los' is not in struct")."""
    args = ["--cfg", f"out_dir={tmp_path}", *args]
    code = train_main(args) if entry == "train" else study_main("batch_size_sweep", args)
    assert code == 2
    line = _one_line(capsys)
    assert line.startswith(f"ayt: config error: {field}: ") and to_type in line, line


def test_a_flag_from_the_shell_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "ayt.train", "--out_dir", "/tmp/x"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "ayt: config error: out_dir: options are key=value, not flags: type `out_dir=/tmp/x`"]


@pytest.mark.parametrize("args, field, words", [
    (["ray.address=127.0.0.1:6379"], "ray.address", "add scaling.backend=ray"),
    (["scaling.num_workers=2"], "scaling.num_workers", "add scaling.backend=ray"),
])
def test_what_only_ray_reads_is_refused_with_the_local_backend(tmp_path, capsys, args, field, words):
    """Mutation caught: `check_backend` gone (the run trains in one process, the address and
    the second worker silently ignored)."""
    assert train_main(["--cfg", f"out_dir={tmp_path}", *args]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ayt: config error: {field}: ") and words in line, line


# ---- --cfg: the real command's checks ------------------------------------------------------

def _failing(tmp) -> list[tuple[list[str], str]]:
    port = _unused_port()
    return [([f"out_dir={UNWRITABLE}"], "out_dir"),
            ([f"out_dir={tmp}", f"tracking.uri=http://127.0.0.1:{port}"], "tracking.uri"),
            ([f"out_dir={tmp}", "scaling.backend=ray", f"ray.address=127.0.0.1:{port}"], "ray.address"),
            ([f"out_dir={tmp}", "fid.inception_weights=/nonexistent/pt_inception.pth"], "fid.inception_weights"),
            ([f"out_dir={tmp}", "scaling.backend=ray", "scaling.num_workers=1024", "batch_size=1024"],
             "scaling.num_workers")]


@pytest.mark.parametrize("index", range(5))
def test_train_dry_run_fails_where_the_run_fails(tmp_path, capsys, index):
    """`--cfg` exits 2 with the line the real command prints. Mutation caught: `--cfg`
    answering before `check_locations` (it exited 0 on an unwritable out_dir)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()       # a Ray of an earlier test would be the cluster the check sees
    args, field = _failing(tmp_path)[index]
    assert train_main(["experiment=smoke", "progress=false", *args]) == 2
    real = _one_line(capsys)
    assert train_main(["--cfg", "experiment=smoke", "progress=false", *args]) == 2
    dry = _one_line(capsys)
    prefix = f"ayt: config error: {field}: "
    assert real.startswith(prefix) and dry.startswith(prefix), (real, dry)
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("index", [0, 1])
def test_study_dry_run_fails_where_the_study_fails(tmp_path, capsys, index):
    args, field = _failing(tmp_path)[index]
    assert study_main("batch_size_sweep", ["--cfg", "study.preset=smoke", *args]) == 2
    assert _one_line(capsys).startswith(f"ayt: config error: {field}: ")


def test_dry_run_survives_a_reader_that_stops_early(tmp_path):
    """`--cfg | head`: the reader is gone before the config is printed. Mutation caught: a
    plain print (BrokenPipeError traceback, exit code 1)."""
    proc = subprocess.Popen([sys.executable, "-m", "ayt.train", "--cfg", f"out_dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_plan_counts_the_trials_of_every_stage(tmp_path):
    """speed_tuned ran 38 trials (16 tuning, one extension round of 2, 20 repeats) where its
    dry run said 20; huber_sweep 68 (48 searched, 4 configurations on 5 seeds) where it said 48."""
    tuned = trial_count(plan_study("speed_tuned", [f"out_dir={tmp_path}"]))
    assert tuned.summary() == {"tuning": 16, "extension rounds": "0 to 16", "repeat": "10 to 20",
                               "total": "26 to 52"}
    assert tuned.least <= 38 <= tuned.most
    searched = trial_count(plan_study("huber_sweep", [f"out_dir={tmp_path}"]))
    assert searched.summary() == {"search": 48, "confirmation": "10 to 20", "total": "58 to 68"}
    assert trial_count(plan_study("batch_size_sweep", [f"out_dir={tmp_path}"])).words() == "8 trials"


def test_the_dry_run_prints_every_stage_and_says_what_resume_does(tmp_path, capsys):
    assert study_main("huber_sweep", ["--cfg", f"out_dir={tmp_path}", "resume=true"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["trials"] == {"search": 48, "confirmation": "10 to 20", "total": "58 to 68"}
    resume = [line for line in err.splitlines() if "resume=true" in line]
    assert len(resume) == 1 and resume[0].startswith("ayt: note: resume=true, but study huber_sweep-") \
        and resume[0].endswith("nothing to resume, it starts from its first trial"), err


# ---- what the study sets per trial ---------------------------------------------------------

SAMPLED = ["study.search=tpe", "study.num_samples=4"]


@pytest.mark.parametrize("args, field", [
    ([*SAMPLED, "+study.axes.training.log_every={low:1,high:50}"], "study.axes.training.log_every"),
    (["+study.axes.training.eval_every=[10,20]"], "study.axes.training.eval_every"),
    (["training.iterations=100"], "training.iterations"),
    (["study.fixed=['training.checkpoint_every=5']"], "study.fixed"),
    (["+study.axes.seed=[1,2]"], "study.axes.seed"),
])
def test_a_value_the_study_sets_per_trial_is_refused_before_any_work(tmp_path, capsys, args, field):
    """An axis on training.log_every once named 60 trials 5.91 ... 47.2 while each ran at 20.
    Mutation caught: `check_not_derived` gone (the axis is overruled by the budget's schedule)."""
    assert study_main("batch_size_sweep", ["--cfg", f"out_dir={tmp_path}", *args]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ayt: config error: {field}: the study sets ") and "overrule" in line, line


def test_a_range_on_an_integer_key_samples_integers_or_is_refused(tmp_path, capsys):
    """Mutation caught: `integer_ranges` gone (Optuna suggests 137.4 samples)."""
    import optuna
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", *SAMPLED,
                                           "+study.axes.fid.num_samples={low:100,high:200}"])
    axis = next(a for a in plan.space.axes if a.key == "fid.num_samples")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = [axis.suggest(study.ask()) for _ in range(5)]
    assert axis.integer and all(isinstance(v, int) and 100 <= v <= 200 for v in values), values
    real = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", *SAMPLED, "+study.axes.lr={low:1e-4,high:1e-2}"])
    assert not next(a for a in real.space.axes if a.key == "lr").integer       # a real-valued key stays real
    capsys.readouterr()                                                       # Optuna's own log line
    assert study_main("batch_size_sweep", ["--cfg", f"out_dir={tmp_path}", *SAMPLED,
                                           "+study.axes.fid.num_samples={low:100.5,high:200}"]) == 2
    line = _one_line(capsys)
    assert "study.axes.fid.num_samples: " in line and "int: true" in line, line
