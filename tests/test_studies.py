"""Studies end to end on a real local Ray and a real sqlite MLflow store: a smoke batch-size
sweep killed and resumed, ASHA early stopping under tight resources, and clear
errors for bad study configs before Ray starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ayt.studies.runner import plan_study, study_main

# Tiny trials on the smoke preset (its artifacts are shared with the other end-to-end tests).
TINY = ["study.preset=smoke", "fid.num_samples=100", "progress=false", "study.budget.evals=2"]


def _children(out: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.parametrize("override, field, words", [
    ("study.axes.batch_size=[]", "study.axes.batch_size", "empty list"),
    ("+study.axes.not_a_key=[1,2]", "study.axes.not_a_key", "unknown axis"),
    ("study.budget.amount=-640", "study.budget.amount", ">= 1"),
    ("study.budget.amount=1000", "study.budget.amount", "multiple of batch_size"),
    ("study.search=annealing", "study.search", "allowed: grid, tpe, random"),
    ("study.seeds=[]", "study.seeds", "non-empty"),
    ("study.scheduler=hyperband", "study.scheduler", "allowed: none, asha"),
    ("study.axes.loss=[pseudo_huber,nope]", "loss", "unknown option 'nope'"),
])
def test_invalid_study_config_fails_before_ray(tmp_path, capsys, override, field, words):
    import ray
    if ray.is_initialized():
        ray.shutdown()      # so "nothing started Ray" can fail; the ray_session fixture restarts it
    code = study_main("batch_size_sweep", [f"out_dir={tmp_path}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and field in err[0] and words in err[0], err
    assert not ray.is_initialized()                     # nothing started Ray
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_plan_grid_budget_in_images_gives_equal_images_per_trial(tmp_path):
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.seeds=[0,1]"])
    assert plan.space.trial_count() == 4 * 2 * 2
    by_batch = {int(c.batch_size): c for c in plan.trial_configs}
    for batch, cfg in by_batch.items():
        assert cfg.training.iterations * batch == 20480
        assert cfg.training.eval_every * 4 == cfg.training.iterations
    assert sorted({int(c.seed) for c in plan.trial_configs}) == [0, 1]
    # The front door runs on the `quick` preset, not the cheaper `smoke` one the tests use.
    assert {(c.pretrain.iterations, c.fid.num_samples) for c in plan.trial_configs} == {(500, 500)}


def test_trial_labels_name_a_trial_by_its_axis_values(tmp_path):
    """Children are named for a person: short axis values in axis order, the seed,
    4 characters of the Tune trial id. Mutation caught: the old `<study id>-<trial id>` name."""
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}"])
    assert plan.space.label({"batch_size": 16, "loss": "mfd", "seed": 0}, "57f90407") == "b16-mfd-s0-57f9"
    huber = plan_study("huber_sweep", [f"out_dir={tmp_path}", "study.num_samples=2", "study.protocol.name=single"])
    assert huber.space.label({"loss__huber_c": 0.00010329669551879738}, "0a1b2c3d") == "huber_c=0.000103-s0-0a1b"


def test_sweep_killed_then_resumed_gives_one_clean_study(ray_session, shared_out_dir, monkeypatch,
                                                          first_finished_child):
    """A smoke batch-size sweep (2 batch sizes x 2 losses) whose driver is killed after the
    first trial finishes, then resumed: one parent, one child per trial, finished trials not
    re-run, every child's FID curve at the right steps, the report written and logged.

    It runs as a user runs it: from a working directory, with a *relative* out_dir. Mutation
    caught: resolving a trial's paths in the trial's own working directory (Tune
    moves each trial into one): every trial then rebuilt the shared artifacts under Ray's
    session directory and wrote its samples and EMA weights there, and the child runs ended
    with no artifacts."""
    out = shared_out_dir
    monkeypatch.chdir(out.parent)
    args = _killed_sweep_args(out, "resumable")
    finished = _run_driver_until_a_trial_finishes(ray_session, first_finished_child, out, "resumable", args)
    client, _, before = _children(out, "resumable")
    done_before = {r.info.run_id: r.info.end_time for r in before if r.info.status == "FINISHED"}
    assert finished in done_before
    assert len(before) < 4 or any(r.info.status != "FINISHED" for r in before)   # killed mid-study

    assert study_main("batch_size_sweep", [*args, "resume=true"]) == 0
    client, parents, after = _children(out, "resumable")
    assert len(parents) == 1 and len(after) == 4                   # one child per trial, no duplicates
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {"ayt.study", "ayt.git_commit", "ayt.config_hash"} <= set(parent.data.tags)
    ends = {r.info.run_id: r.info.end_time for r in after}
    for run_id, end in done_before.items():
        assert ends[run_id] == end                                 # finished trials did not run again
    seen = set()
    for child in after:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        batch = int(child.data.params["batch_size"])
        seen.add((batch, child.data.params["loss"]))
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval/fid_1step")]
        assert steps == [320 // batch, 640 // batch], steps      # two evaluations over 640 images
        by_images = [m.step for m in client.get_metric_history(child.info.run_id, "eval/fid_1step_vs_images")]
        assert by_images == [320, 640]
        # The loss at the trial's log_every (half an evaluation interval here), not only at
        # evaluations: the points between two reports reach MLflow through `history`.
        losses = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert losses == [k * 160 // batch for k in (1, 2, 3, 4)], losses
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples_1step.png", "samples_2step.png", "fid_curve.png", "ema.pt"} <= artifacts, artifacts
    assert seen == {(16, "pseudo_huber"), (16, "mfd"), (32, "pseudo_huber"), (32, "mfd")}
    # No trial built an artifact of its own: nothing under Ray's session directory (where
    # Tune runs trials) holds a cache or a run directory.
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    assert not [p for p in session.rglob("cache") if p.is_dir()], "a trial rebuilt the shared artifacts"
    assert not list(session.rglob("ema.pt"))
    # Restarting a study that exists, without resume=true, is refused (nothing runs).
    assert study_main("batch_size_sweep", args) == 2
    import optuna
    study = optuna.load_study(study_name=parent.info.run_name,
                              storage=f"sqlite:///{out / 'resumable' / 'optuna.db'}")
    # Each grid point completed exactly once. A trial the killed driver had asked for but Tune
    # never saved is failed (possibly before it had any parameters) and retried on its grid
    # point; nothing else is left running or waiting.
    from optuna.trial import TrialState
    completed = [tuple(sorted(t.params.items())) for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(completed) == len(set(completed)) == 4, completed
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.FAIL}

    report = out / "resumable"
    for name in ("report.md", "fid_1step.png", "fid_2step.png", "final_vs_axis.png", "trials.csv", "curves.csv"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "batch_size=16, loss=mfd" in text and "iterations to target" in text
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged


def _save_tune_state(plan, searcher, *trial_ids: str, stamp: str = "2026-01-01_00-00-00",
                     trial_list: bool = True) -> Path:
    """What Tune saves of a study after a step: its trial list (unless `trial_list` is false),
    its search generator and its searcher (whose path this returns)."""
    import json

    import ray.cloudpickle as cloudpickle
    root = Path(plan.experiment_path)
    root.mkdir(parents=True, exist_ok=True)
    if trial_list:
        trial_data = [[json.dumps({"trial_id": i, "status": "RUNNING"}), {}] for i in trial_ids]
        (root / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": trial_data, "runner_data": {}}))
    generator = {"counter": len(trial_ids), "total_samples": plan.space.trial_count(), "finished": False,
                 "experiment": None}
    (root / f"search_gen_state-{stamp}.json").write_bytes(cloudpickle.dumps(generator))
    searcher.save(str(root / f"searcher-state-{stamp}.pkl"))
    return root / f"searcher-state-{stamp}.pkl"


def test_resume_requeues_an_optuna_trial_that_tune_never_saved(tmp_path):
    """The race a killed driver can leave behind (the kill-and-resume test hit it): Optuna
    handed out a grid point, then the driver died before Tune saved the trial. Without the
    re-queue, the resumed study never runs that point and the GridSampler repeats another."""
    import optuna
    from optuna.trial import TrialState

    from ayt.studies.engine.resume import requeue_orphaned_trials
    from ayt.studies.engine.tune_backend import optuna_searcher
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke", "study.axes.batch_size=[16,32]"])
    searcher = optuna_searcher(plan)
    first = searcher.suggest("tune-a")                     # a trial Tune owns and saved
    _save_tune_state(plan, searcher, "tune-a")
    orphan = searcher.suggest("tune-b")                    # asked for, then the driver died

    assert requeue_orphaned_trials(plan) == 1
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{plan.out_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert requeue_orphaned_trials(plan) == 0               # idempotent: the retry is not an orphan

    restored = optuna_searcher(plan)                       # what Tuner.restore does
    restored.restore(str(Path(plan.experiment_path) / "searcher-state-2026-01-01_00-00-00.pkl"))
    rest = [restored.suggest(f"tune-{k}") for k in "cde"]
    assert rest[0] == orphan                               # the lost point comes first
    points = [tuple(sorted(c.items())) for c in [first, *rest]]
    assert len(set(points)) == 4 == plan.space.trial_count()


def test_resume_asks_again_for_a_trial_the_saved_trial_list_lost(tmp_path):
    """Tune's state is several files synced one after another: a driver killed between them can
    leave a search generator counting 2 trials over a trial list of 1 (the CI run of stop 26
    ended so: `1 trials (0 failed)`, a child RUNNING, exit 0). The lost trial counts as an
    orphan, the count drops to the list and the concurrency limiter frees its slot. Mutation
    caught: trusting the counter (it stays 2 and the grid point is never run)."""
    import json

    import optuna
    import ray.cloudpickle as cloudpickle
    from optuna.trial import TrialState

    from ayt.studies.engine.resume import requeue_orphaned_trials
    from ayt.studies.engine.tune_backend import optuna_searcher
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke", "study.axes.batch_size=[16,32]"])
    searcher = optuna_searcher(plan)
    searcher.suggest("tune-a")
    searcher.suggest("tune-b")
    root = Path(plan.experiment_path)
    root.mkdir(parents=True)
    stamp = "2026-01-01_00-00-00"
    searcher.save(str(root / f"searcher-state-{stamp}.pkl"))              # the searcher owns both
    (root / f"experiment_state-{stamp}.json").write_text(json.dumps(       # the list holds one
        {"trial_data": [[json.dumps({"trial_id": "tune-a", "status": "RUNNING"}), {}]], "runner_data": {}}))
    generator = {"counter": 2, "total_samples": 4, "finished": False, "experiment": None,
                 "name:ConcurrencyLimiter": {"live_trials": {"tune-a", "tune-b"}, "num_unfinished_live_trials": 2}}
    (root / f"search_gen_state-{stamp}.json").write_bytes(cloudpickle.dumps(generator))

    assert requeue_orphaned_trials(plan) == 1
    saved = cloudpickle.loads((root / f"search_gen_state-{stamp}.json").read_bytes())
    assert saved["counter"] == 1 and saved["name:ConcurrencyLimiter"]["live_trials"] == {"tune-a"}
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{plan.out_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert requeue_orphaned_trials(plan) == 0                               # idempotent


def test_a_trial_optuna_finished_after_tunes_last_save_resumes_without_reporting_to_optuna(tmp_path):
    """A driver killed after telling Optuna a trial finished but before Tune saved again: Tune
    resumes the trial from its final checkpoint, and OptunaSearch's report to the finished
    Optuna trial failed the resumed study (UpdateFinishedTrialError; the cluster rehearsal's
    S3 resume hit it). The resume marks it completed in the saved searcher, whose results are
    then ignored. Mutation caught: not settling it (the restored searcher's report raises)."""
    import optuna

    from ayt.studies.engine.resume import requeue_orphaned_trials
    from ayt.studies.engine.tune_backend import optuna_searcher
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke", "study.axes.batch_size=[16,32]"])
    searcher = optuna_searcher(plan)
    searcher.suggest("tune-a")
    saved = _save_tune_state(plan, searcher, "tune-a")      # Tune's last save: tune-a running
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{plan.out_dir / 'optuna.db'}")
    study.tell(study.trials[0].number, 120.0)               # then Optuna heard it finish; the driver died

    assert requeue_orphaned_trials(plan) == 0               # not an orphan: Tune owns it
    restored = optuna_searcher(plan)                        # what Tuner.restore does
    restored.restore(str(saved))
    restored.on_trial_result("tune-a", {plan.metric: 118.0, "training_iteration": 5})   # must not raise
    restored.on_trial_complete("tune-a", {plan.metric: 118.0})
    assert [t.value for t in optuna.load_study(study_name=plan.study_id,
                                               storage=f"sqlite:///{plan.out_dir / 'optuna.db'}").trials] == [120.0]


@pytest.mark.parametrize("cut, older_list, requeued", [("experiment_state-", False, 2), ("experiment_state-", True, 1),
                                                       ("searcher-state-", False, 2)])
def test_resume_sets_aside_a_state_file_a_killed_copy_cut_short(tmp_path, cut, older_list, requeued):
    """Tune copies its state files to storage without an atomic rename: a driver killed
    mid-copy left `experiment_state-*.json` cut short, and the resume died in a
    JSONDecodeError (seen once in a 2-thread run of the kill-and-resume test). The file is set
    aside, and the resume goes on from an older complete trial list (an earlier driver's,
    listing tune-a: only tune-b is an orphan) or, with none, as a driver killed before Tune
    saved (both are orphans, and a new Tuner runs the rest); a searcher cut short leaves Tune
    nothing to restore either. Mutation caught: reading the newest file as it is (the
    resume raises)."""
    import optuna

    from ayt.studies.engine.resume import TuneOptunaState, requeue_orphaned_trials
    from ayt.studies.engine.tune_backend import optuna_searcher
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke", "study.axes.batch_size=[16,32]"])
    searcher = optuna_searcher(plan)
    searcher.suggest("tune-a")
    searcher.suggest("tune-b")
    root = Path(plan.experiment_path)
    _save_tune_state(plan, searcher, "tune-a", "tune-b", stamp="2026-01-02_00-00-00")
    if older_list:                                          # an earlier driver's state, complete
        _save_tune_state(plan, searcher, "tune-a", stamp="2026-01-01_00-00-00")
    (newest,) = root.glob(f"{cut}2026-01-02_00-00-00.*")
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])        # the copy the kill cut short

    assert requeue_orphaned_trials(plan) == requeued
    assert not newest.exists() and newest.with_name(newest.name + ".unreadable").exists()
    assert TuneOptunaState(plan).has_experiment_state() == older_list
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{plan.out_dir / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == sorted(
        ["RUNNING"] * (2 - requeued) + ["FAIL", "WAITING"] * requeued)
    assert requeue_orphaned_trials(plan) == 0                  # idempotent


def test_resume_closes_the_run_of_a_trial_optuna_finished_and_deletes_the_others(tmp_path):
    """Tune tells the searcher (Optuna) that a trial completed before its callbacks close the
    trial's MLflow run. A driver killed in between, before Tune saved its state, left the
    resume deleting that run as one of a trial Tune never saved, and Optuna, which had it
    COMPLETE, never ran it again: the study finished with 3 of its 4 children, exit code 0
    (seen once in a 2-thread run of the test below). The searcher writes the Tune trial on the
    Optuna trial, so the resume closes the finished trial's run (FINISHED, with its metrics)
    and deletes only the run of the trial it queues again. Mutation caught: deleting every
    RUNNING child whose trial Tune did not save, as before."""
    from types import SimpleNamespace

    import optuna
    from optuna.trial import TrialState

    from ayt.studies.engine.resume import requeue_orphaned_trials
    from ayt.studies.engine.tracker import StudyTracker
    from ayt.studies.engine.tune_backend import optuna_searcher
    from ayt.tracking import start_or_resume_run
    plan = plan_study("batch_size_sweep", [f"out_dir={tmp_path}", "study.preset=smoke", "study.axes.batch_size=[16,32]"])
    uri, experiment = str(plan.base.tracking.uri), str(plan.base.tracking.experiment)
    parent_id, _ = start_or_resume_run(uri, experiment, plan.study_id, {})
    killed = StudyTracker(uri, experiment, parent_id, plan.name, plan.describe)     # the first driver's
    searcher = optuna_searcher(plan)
    trials = {t: SimpleNamespace(trial_id=t, config=searcher.suggest(t), last_result=None) for t in ("tune-a", "tune-b")}
    for trial in trials.values():
        killed.on_trial_start(0, [], trial)
    planned = killed.planned["tune-a"]
    killed.on_trial_result(0, [], trials["tune-a"], {"iteration": planned, "images_seen": planned,
                                                     "eval/fid_1step": 100.0, plan.tune_metric: 100.0})
    searcher.on_trial_complete("tune-a", result={plan.tune_metric: 100.0})   # Optuna: COMPLETE; then the kill
    client = MlflowClient(uri)
    run_a, run_b = (killed.loggers[t].run_id for t in ("tune-a", "tune-b"))
    assert client.get_run(run_a).info.status == "RUNNING"

    resumed = StudyTracker(uri, experiment, parent_id, plan.name, plan.describe)    # the resumed driver's
    assert requeue_orphaned_trials(plan, parent_id, close_run=resumed.close_run) == 1       # tune-b
    assert client.get_run(run_a).info.status == "FINISHED"
    assert client.get_run(run_a).info.lifecycle_stage == "active"
    assert [m.step for m in client.get_metric_history(run_a, "eval/fid_1step")] == [planned]
    assert client.get_run(run_b).info.lifecycle_stage == "deleted"
    study = optuna.load_study(study_name=plan.study_id, storage=f"sqlite:///{plan.out_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]


def test_a_run_a_killed_driver_created_without_its_params_gets_them_when_reopened(tmp_path):
    """The tracker creates a trial's MLflow run, then logs its params: a driver killed in
    between (a 1-thread run of the kill-and-resume test above hit it) left a child run with no
    params, which the resume reopened as it was, with no axis values for the report or the
    MLflow UI. Reopening logs the params a run lacks and leaves those it has. Mutation caught:
    reopening as before (the run keeps only `seed`)."""
    from ayt.tracking import RUN_NAME_TAG, get_or_create_experiment, start_or_resume_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    killed = client.create_run(get_or_create_experiment(client, "study"), tags={RUN_NAME_TAG: "study-tune-a"})
    client.log_param(killed.info.run_id, "seed", "0")                 # then the kill
    run_id, resumed = start_or_resume_run(uri, "study", "study-tune-a", {"batch_size": 16, "loss": "mfd", "seed": 0})
    assert (run_id, resumed) == (killed.info.run_id, True)
    assert client.get_run(run_id).data.params == {"batch_size": "16", "loss": "mfd", "seed": "0"}


def test_a_driver_killed_before_tune_saved_its_state_still_resumes_every_trial(ray_session, shared_out_dir,
                                                                             monkeypatch, first_finished_child):
    """Tune writes tuner.pkl at once but syncs its experiment state to storage only after its
    steps, so a driver killed early (CI saw it on a loaded machine) leaves a Tuner with nothing
    to restore: Tune then started over, ran one unvisited grid point and stopped, leaving a
    child RUNNING forever and reporting success. Here the kill comes after the first trial and
    Tune's synced state is removed, as the early kill leaves it. Mutation caught (CI, stop 26):
    restoring anyway: 3 of 4 children, one RUNNING, exit code 0."""
    import glob
    out = shared_out_dir
    monkeypatch.chdir(out.parent)
    args = _killed_sweep_args(out, "unsaved")
    _run_driver_until_a_trial_finishes(ray_session, first_finished_child, out, "unsaved", args)
    (experiment,) = glob.glob(str(out / "ray" / "unsaved-*"))
    for saved in (glob.glob(f"{experiment}/experiment_state-*") + glob.glob(f"{experiment}/searcher-state-*")
                  + glob.glob(f"{experiment}/search_gen_state-*")):
        os.remove(saved)
    assert (Path(experiment) / "tuner.pkl").exists()

    assert study_main("batch_size_sweep", [*args, "resume=true"]) == 0
    _, parents, after = _children(out, "unsaved")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted((r.data.params["batch_size"], r.data.params["loss"]) for r in after) == \
        [("16", "mfd"), ("16", "pseudo_huber"), ("32", "mfd"), ("32", "pseudo_huber")]
    assert all(r.info.status == "FINISHED" for r in after), [(r.info.run_name, r.info.status) for r in after]


def _killed_sweep_args(out: Path, name: str) -> list[str]:
    """A smoke sweep of 2 batch sizes x 2 losses, run from out's parent with a relative out_dir."""
    return [f"out_dir={out.name}", f"study.name={name}", "study.axes.batch_size=[16,32]",
            "study.axes.loss=[pseudo_huber,mfd]", "study.budget.amount=640", "study.max_concurrent_trials=2", *TINY]


def _run_driver_until_a_trial_finishes(ray_session, first_finished_child, out: Path, name: str,
                                       args: list[str]) -> str:
    """Start the study's driver as a user would (its own process, on the test session's Ray),
    SIGKILL it once a child run has finished, and return that run's id."""
    address = ray_session.get_runtime_context().gcs_address
    log = (out / f"{name}-driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ayt.studies.batch_size_sweep", *args, f"ray.address={address}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=out.parent,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        children = (lambda: _children(out, name)[2] if (out / "mlflow.db").exists() else [])
        finished = first_finished_child(children, proc, timeout=300)
    except AssertionError:
        raise AssertionError((out / f"{name}-driver.log").read_text()[-3000:]) from None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(3)
    return finished


def test_asha_stopped_trials_release_their_workers_and_are_marked(ray_session, shared_out_dir, monkeypatch):
    """Workers take 3 of the session's 4 CPUs, so a stopped trial whose Ray Train placement
    group leaked would leave the next trial's workers unable to start. ASHA (in this driver)
    ranks the trials by a stand-in FID the test sets, 100 at lr 0.002 and 200 at the two that
    barely move, so which trials it stops does not rest on the numbers a machine trains to."""
    from ray.tune.schedulers import ASHAScheduler
    on_result, on_complete = ASHAScheduler.on_trial_result, ASHAScheduler.on_trial_complete

    def stand_in(asha, trial, result: dict) -> dict:
        if asha._metric not in result:
            return result
        return {**result, asha._metric: 100.0 if float(trial.config["lr"]) >= 1e-3 else 200.0}

    def trial_result(self, runner, trial, result):
        return on_result(self, runner, trial, stand_in(self, trial, result))

    def trial_complete(self, runner, trial, result):
        on_complete(self, runner, trial, stand_in(self, trial, result))
    monkeypatch.setattr(ASHAScheduler, "on_trial_result", trial_result)
    monkeypatch.setattr(ASHAScheduler, "on_trial_complete", trial_complete)
    out = shared_out_dir
    code = study_main("batch_size_sweep", [
        f"out_dir={out}", "study.name=early-stop", "study.axes.batch_size=[16]", "+study.axes.lr=[0.002,1e-9,1e-8]",
        "study.axes.loss=[mfd]", "study.seeds=[0]", "study.scheduler=asha", "study.asha.grace_evals=1",
        "study.asha.reduction_factor=2", "study.budget.amount=640", "study.max_concurrent_trials=1",
        # Optuna's GridSampler order is seeded: with 1 the lr=0.002 trial runs first, so the two
        # that barely move (lr=1e-8, 1e-9) reach the first rung behind it and ASHA stops both;
        # the last one starts only after the first stopped trial gave its workers back.
        "study.sampler_seed=1", "scaling.resources_per_worker.CPU=3", "cpu_threads=1",
        "ray.worker_start_timeout_s=120", *TINY])
    assert code == 0
    client, parents, children = _children(out, "early-stop")
    assert len(children) == 3
    stopped = [r for r in children if r.data.tags.get("ayt.stopped_early") == "true"]
    full = [r for r in children if r.data.tags.get("ayt.stopped_early") == "false"]
    assert len(stopped) + len(full) == 3
    assert {r.data.params["lr"] for r in stopped} == {"1e-09", "1e-08"} and len(stopped) == 2
    for run in stopped:
        assert run.info.status == "KILLED"
        assert int(run.data.tags["ayt.final_iteration"]) == 20
    assert all(r.info.status == "FINISHED" for r in full)
    assert "stopped early" in (out / "early-stop" / "report.md").read_text()


def test_sampled_studies_plan_their_ranges_and_lpips_is_skipped_with_the_reason(tmp_path):
    """The TPE front doors (aug_sweep, huber_sweep) plan: every range axis is validated at its
    corners, and loss_sweep without VGG weights drops LPIPS and says why. Mutations caught:
    a range axis planned as a categorical, a corner left unvalidated, the skip reason lost."""
    aug = plan_study("aug_sweep", [f"out_dir={tmp_path}", "study.preset=smoke"])
    assert aug.space.search == "tpe" and aug.space.trial_count() == 48
    ranges = {a.key: (a.low, a.high) for a in aug.space.all_axes if a.values is None}
    assert ranges["augment.p"] == (0.05, 0.5) and ranges["augment.noise_std"] == (0.05, 1.0)
    # Corners: the first point, then each axis at its other end(s).
    assert len(aug.trial_configs) == 1 + sum(len(a.corners()) - 1 for a in aug.space.all_axes)
    assert {float(c.augment.p) for c in aug.trial_configs} == {0.05, 0.5}
    huber = plan_study("huber_sweep", [f"out_dir={tmp_path}", "study.preset=smoke"])
    (axis,) = [a for a in huber.space.all_axes if a.key == "loss.huber_c"]
    assert (axis.low, axis.high, axis.log) == (0.0001, 0.1, True)
    assert sorted(float(c.loss.huber_c) for c in huber.trial_configs) == [0.0001, 0.1]
    losses = plan_study("loss_sweep", [f"out_dir={tmp_path}", "study.preset=smoke"])
    (loss_axis,) = [a for a in losses.space.axes if a.key == "loss"]
    assert "lpips" not in loss_axis.values and "mfd" in loss_axis.values
    assert len(losses.skipped) == 1 and "lpips skipped" in losses.skipped[0] and "loss.vgg_weights" in losses.skipped[0]


def test_random_search_samples_the_range_and_a_diverging_trial_fails_with_its_reason(ray_session, shared_out_dir,
                                                                                      capsys):
    """huber_sweep with random search over its log range: two trials with distinct constants
    inside the range, each an MLflow child with the sampled value. One more trial at an
    absurd learning rate runs on the Ray Train path and diverges: its trial fails (no
    retry), and the tracker marks its child FAILED with the reason. Mutations caught: the
    sampled value not reaching the trial config; a NaN on the Ray Train path reported as
    success; the tracker's error path not tagging the run."""
    out = shared_out_dir
    plain = ["study.protocol.name=single", "study.scheduler=none"]       # the search alone, every trial to the end
    assert study_main("huber_sweep", [f"out_dir={out}", "study.name=random-huber", "study.search=random",
                                      "study.num_samples=2", "study.budget.amount=128", "study.max_concurrent_trials=1",
                                      "batch_size=32", *plain, *TINY]) == 0
    # progress=false (TINY) drops the bar, not the one line per trial start and end.
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert sum(" started: " in line for line in printed) == 2, printed
    assert sum(" finished: " in line and "fid_1step" in line for line in printed) == 2, printed
    client, parents, children = _children(out, "random-huber")
    values = sorted(float(r.data.params["loss.huber_c"]) for r in children)
    assert len(children) == 2 and len(set(values)) == 2 and all(1e-4 <= v <= 0.1 for v in values)
    assert all(r.data.params["axis.loss__huber_c"] == r.data.params["loss.huber_c"] for r in children)
    # Readable names: the MLflow run name is the label the console printed; the
    # study id stays in a tag.
    for run in children:
        value, trial_id = float(run.data.params["loss.huber_c"]), run.data.tags["ayt.trial_id"]
        assert run.info.run_name == f"huber_c={value:.3g}-s0-{trial_id[:4]}", run.info.run_name
        assert any(line.startswith(f"trial {run.info.run_name} finished: ") for line in printed), printed
        assert run.data.tags["ayt.study_id"] == parents[0].info.run_name
    # Provenance: each child records the code that trained it, as its trial reported it.
    from ayt.provenance import code_version, split_version
    now = code_version()
    for run in children:
        assert run.data.tags["ayt.code_version"] == now and run.data.tags["ayt.code_versions"] == now
        assert (run.data.tags["ayt.git_commit"], run.data.tags["ayt.git_dirty"]) == \
            (split_version(now)[0], str(split_version(now)[1]).lower())
    # Resuming on other code is refused before any work, naming both versions and the
    # override; with the override it goes on and records both. The parent is made to look
    # as if it had started on another commit (its tags are what the check reads).
    other = "0" * 40
    client.set_tag(parents[0].info.run_id, "ayt.code_versions", other)
    args = [f"out_dir={out}", "study.name=random-huber", "study.search=random", "study.num_samples=2",
            "study.budget.amount=128", "study.max_concurrent_trials=1", "batch_size=32", *plain, *TINY, "resume=true"]
    capsys.readouterr()
    assert study_main("huber_sweep", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0000000" in err[0] and now[:7] in err[0] and "study.allow_code_change=true" in err[0], err
    assert study_main("huber_sweep", [*args, "study.allow_code_change=true"]) == 0
    client, parents, again = _children(out, "random-huber")
    assert len(parents) == 1 and len(again) == 2                 # nothing duplicated
    assert parents[0].data.tags["ayt.code_versions"] == f"{other},{now}"
    report = (out / "random-huber" / "report.md").read_text()
    assert f"code that trained the trials: `{now[:7]}" in report, report

    code = study_main("batch_size_sweep", [f"out_dir={out}", "study.name=diverges", "study.axes.batch_size=[32]",
                                           "study.axes.loss=[pseudo_huber]", "study.budget.amount=640",
                                           "study.trial_backend=ray_train", "study.max_failures=0", "lr=1e30",
                                           "ray.worker_start_timeout_s=120", *TINY])
    assert code == 1                                           # the study ran, one trial failed
    client, parents, children = _children(out, "diverges")
    assert [r.info.status for r in children] == ["FAILED"]
    assert "non-finite loss at iteration" in children[0].data.tags["ayt.failure"]
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["ayt.trials_failed"] == "1"
    report = (out / "diverges" / "report.md").read_text()     # counted and listed, not averaged in silently
    assert "## Diverged trials (1 of 1)" in report and "non-finite loss" in report


def test_tune_then_repeat_runs_each_group_at_its_own_best_lr(ray_session, shared_out_dir, stand_in_metric):
    """The protocol end to end: stage 1 tunes lr per loss on the tuning seed (2 values each),
    stage 2 reruns each loss at the lr with the lowest stage-1 FID on the repeat seed, and the
    report says which lr each group ran at. The driver decides on a stand-in FID the test sets
    (pseudo-Huber lowest at 1e-3, MFD at 8e-3), so the two groups' winners differ on every
    machine. Mutations caught: one lr shared by both groups; the best picked by the highest
    FID; stage 2 reusing the tuning seed; the section missing."""
    out = shared_out_dir
    stand_in_metric(lambda p: 100 + 1000 * float(p["lr"]) * (1 if p["loss"] == "pseudo_huber" else -1))
    args = [f"out_dir={out}", "study.name=ttr", "study.protocol.name=tune_then_repeat", "study.seeds=[0]",
            "study.protocol.tune.low=1e-3", "study.protocol.tune.high=8e-3", "study.protocol.tune.points=2",
            "study.protocol.tune.seeds=[7]", "study.protocol.tune.allow_one_seed=true",
            "study.protocol.tune.max_extensions=0",          # extension rounds: tests/test_protocol.py
            "study.budget.amount=40", "study.max_concurrent_trials=1", *TINY]
    assert study_main("speed", args) == 0
    _, _, tuning = _children(out, "ttr-tune")
    for loss in ("pseudo_huber", "mfd"):
        runs = [r for r in tuning if r.data.params["loss"] == loss]
        assert sorted(float(r.data.params["lr"]) for r in runs) == [1e-3, 8e-3]
        assert {r.data.params["seed"] for r in runs} == {"7"}
        assert all(r.info.status == "FINISHED" for r in runs)
    chosen = {"pseudo_huber": 1e-3, "mfd": 8e-3}                       # the stand-in's minima
    _, parents, repeat = _children(out, "ttr")
    assert len(parents) == 1 and len(repeat) == 2
    for run in repeat:
        assert run.data.params["seed"] == "0"
        assert float(run.data.params["lr"]) == chosen[run.data.params["loss"]]
    text = (out / "ttr" / "report.md").read_text()
    assert "## Protocol: tune, then repeat" in text
    for loss, lr in chosen.items():       # two values tried: whichever wins is at an edge of the range
        assert f"| loss={loss} | {lr} (edge) |" in text
