"""Resuming a study: what Ray Tune and Optuna saved of it, read and repaired before
`Tuner.restore` (ayt.studies.engine.tune_backend) picks it up.

Tune and Optuna keep the state a resume needs private, so every access to it lives in one
class, `TuneOptunaState`: a Ray or Optuna version that changes that state breaks there, and
its error says so, instead of a resume quietly running a trial twice or never.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

from ayt.errors import ConfigError
from ayt.studies.engine.plan import StudyPlan

log = logging.getLogger(__name__)


class TuneOptunaState:
    """One study's saved Tune experiment and Optuna study, as a resume reads and repairs them.

    Checked against ray 2.60.0 and optuna 5.0.0. The private state it touches:
    - Tune's experiment directory: `tuner.pkl` (ray.tune.impl.tuner_internal._TUNER_PKL) once
      a Tuner has saved, `experiment_state-<time>.json` (TuneController.CKPT_FILE_TMPL), synced
      there from the driver's staging directory after Tune's steps (a driver killed early
      leaves `tuner.pkl` alone, and `Tuner.restore` then starts over), and
      `searcher-state-<time>.pkl` (Searcher.CKPT_FILE_TMPL), which `OptunaSearch.save` writes
      as its pickled `__dict__`;
    - in that dict, OptunaSearch's `_ot_trials`: Tune trial id -> the Optuna trial it asked for;
    - Optuna's `Trial._trial_id` / `FrozenTrial._trial_id` (the storage's id) and
      `Study._storage`, to hand a failed trial to Optuna's retry callback as Optuna does;
    - Tune's trial list, `experiment_state-<time>.json` (`trial_data`: each trial's JSON with
      its `trial_id`), and its search generator's `search_gen_state-<time>.json` (a cloudpickled
      dict: `counter`, the trials it created; `finished`; `name:ConcurrencyLimiter` with its
      `live_trials`), which `SearchGenerator.restore_from_dir` reads back;
    - these three files are copied to storage without an atomic rename, so a driver killed
      mid-copy leaves one cut short, which Tune's restore would fail to read;
    - the Optuna user attribute `ayt.tune_trial_id` that the study's searcher
      (ayt.studies.engine.searcher, which reads OptunaSearch's `_ot_trials`) writes.
    """

    # Tune's saved state, (prefix, suffix, parser) of each kind of file: `Tuner.restore` needs all three.
    STATE_FILES = (("experiment_state-", ".json", json.loads),
                   ("searcher-state-", ".pkl", pickle.loads),
                   ("search_gen_state-", ".json", lambda data: _cloudpickle().loads(data)))

    def __init__(self, plan: StudyPlan):
        self.study_id = plan.study_id
        self.experiment_path = plan.experiment_path
        self.optuna_db = plan.optuna_db

    def experiment_exists(self) -> bool:
        """Whether Tune saved this study's experiment (so `Tuner.restore` can pick it up)."""
        path = self.experiment_path
        if "://" in path:
            import pyarrow.fs
            fs, inner = pyarrow.fs.FileSystem.from_uri(path)
            return fs.get_file_info(inner + "/tuner.pkl").type != pyarrow.fs.FileType.NotFound
        return (Path(path) / "tuner.pkl").exists()

    def has_experiment_state(self) -> bool:
        """Whether Tune's saved state can be restored: its trial list (`experiment_state-*.json`),
        searcher and search generator all reached the experiment's storage. Tune writes
        `tuner.pkl` at once but copies these from the driver's staging directory after its
        steps, one after another, so a driver killed early leaves none or only some, and
        `Tuner.restore` fails without any one of them."""
        return all(self._newest(prefix, suffix) is not None for prefix, suffix, _ in self.STATE_FILES)

    def saved_trial_ids(self) -> set[str] | None:
        """The Tune trials in Tune's newest saved trial list (what `Tuner.restore` resumes);
        None when Tune saved none."""
        newest = self._newest("experiment_state-", ".json")
        if newest is None:
            return None
        fs, path = newest
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        ids = set()
        for trial_json, *_ in data.get("trial_data", []):
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            ids.add(str(trial["trial_id"]))
        return ids

    def reconcile_search_counter(self, saved: set[str]) -> int:
        """Lower the search generator's count of created trials to the trials Tune's saved
        list holds; returns how many it had counted but the list lost.

        Tune's state is several files, synced to its storage one after another in the
        background after each step. A driver killed during a sync can leave a generator that
        counts trials the trial list lacks: the resumed study then never creates them and
        finishes short, exit code 0. With the count lowered the study asks for them again (their
        Optuna trials are re-queued by `requeue_orphaned_trials`); the concurrency limiter
        forgets them too, or it would hold a slot for each forever."""
        newest = self._newest("search_gen_state-", ".json")
        if newest is None:
            return 0
        import ray.cloudpickle as cloudpickle
        fs, path = newest
        with fs.open_input_stream(path) as f:
            state = cloudpickle.loads(f.read())
        if not isinstance(state, dict) or not isinstance(state.get("counter"), int):
            import ray
            raise ConfigError("study.resume", "cannot read Ray Tune's saved search generator state (its format "
                              f"changed in ray {ray.__version__}); resume is not safe with this Ray version")
        lost = state["counter"] - len(saved)
        if lost <= 0:
            return 0
        state["counter"], state["finished"] = len(saved), False
        limiter = state.get("name:ConcurrencyLimiter")
        if isinstance(limiter, dict) and isinstance(limiter.get("live_trials"), set):
            limiter["live_trials"] = {t for t in limiter["live_trials"] if t in saved}
            limiter["num_unfinished_live_trials"] = min(int(limiter.get("num_unfinished_live_trials", 0)),
                                                        len(limiter["live_trials"]))
        with fs.open_output_stream(path) as f:       # one object, replaced whole
            f.write(cloudpickle.dumps(state))
        return lost

    def set_aside_unreadable(self) -> list[str]:
        """Rename each of Tune's newest state files that does not parse to `<name>.unreadable`,
        until the newest of each kind parses or none is left; returns the names set aside.

        A driver killed while Tune copied its state to storage leaves the file cut short
        (`JSONDecodeError` in the middle of `experiment_state-*.json`), and `Tuner.restore`,
        which reads the newest, fails. Set aside, the file no longer matches Tune's pattern:
        the resume goes on from the newest complete state, or, with none left, as a driver
        killed before Tune saved anything (the Optuna study says what finished)."""
        moved = []
        for prefix, suffix, parse in self.STATE_FILES:
            while (newest := self._newest(prefix, suffix)) is not None:
                fs, path = newest
                try:
                    with fs.open_input_stream(path) as f:
                        parse(f.read())
                    break
                except Exception:                  # any parse error: truncated or corrupt
                    fs.move(path, path + ".unreadable")
                    moved.append(path.rsplit("/", 1)[-1])
        return moved

    def finished_by_tune_trial(self) -> dict[str, Any]:
        """Tune trial id -> the Optuna trial (FrozenTrial) Optuna finished (COMPLETE or PRUNED)
        for it, from the attribute the study's searcher writes (`TUNE_TRIAL_ATTR`)."""
        if not self.has_study():
            return {}
        from optuna.trial import TrialState

        from ayt.studies.engine.searcher import TUNE_TRIAL_ATTR
        return {t.user_attrs[TUNE_TRIAL_ATTR]: t
                for t in self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if TUNE_TRIAL_ATTR in t.user_attrs}

    def has_study(self) -> bool:
        """Whether Optuna created the study (OptunaSearch does when the Tuner starts)."""
        if not self.optuna_db.exists():
            return False
        try:
            self._study
        except KeyError:                    # the file holds no study of this name
            return False
        return True

    def finished_trials(self) -> int:
        """Optuna trials of the study that finished (COMPLETE or PRUNED): what need not run again."""
        if not self.has_study():
            return 0
        from optuna.trial import TrialState
        return len(self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def tune_owned_trials(self) -> dict[str, int] | None:
        """Tune trial id -> Optuna storage trial id, for every trial Tune's newest saved
        searcher owns; None when Tune saved no searcher or Optuna no study yet."""
        saved = self._latest_searcher_state()
        if saved is None or not self.optuna_db.exists():
            return None
        owned = saved.get("_ot_trials") if isinstance(saved, dict) else None
        if not isinstance(owned, dict) or not all(hasattr(t, "_trial_id") for t in owned.values()):
            # If the shape changed, re-queueing "every running trial" would duplicate work.
            # Stop and say so instead.
            import ray
            raise ConfigError("study.resume", "cannot read Ray Tune's saved OptunaSearch state (its format changed "
                              f"in ray {ray.__version__}); resume is not safe with this Ray version")
        return {tune_id: t._trial_id for tune_id, t in owned.items()}

    def settle_finished(self, owned: dict[str, int]) -> int:
        """Mark as completed, in Tune's newest saved searcher, each owned trial Optuna already
        finished; returns how many. A driver killed after telling Optuna a trial finished but
        before Tune's next save leaves that trial unfinished in Tune's state: the resume runs it
        again from its final checkpoint, and OptunaSearch reporting to the finished Optuna trial
        fails the study (UpdateFinishedTrialError). In `_completed_trials` its results are
        ignored, as OptunaSearch ignores a completed trial's late results anyway."""
        newest = self._newest("searcher-state-", ".pkl")
        if newest is None or not owned or not self.has_study():
            return 0
        fs, path = newest
        with fs.open_input_stream(path) as f:
            saved = pickle.loads(f.read())
        completed = saved.get("_completed_trials") if isinstance(saved, dict) else None
        if not isinstance(completed, set):
            import ray
            raise ConfigError("study.resume", "cannot read Ray Tune's saved OptunaSearch state (its format changed "
                              f"in ray {ray.__version__}); resume is not safe with this Ray version")
        finished = {t._trial_id for t in self._study.get_trials(deepcopy=False) if t.state.is_finished()}
        settled = {tune_id for tune_id, optuna_id in owned.items() if optuna_id in finished} - completed
        if settled:
            saved["_completed_trials"] = completed | settled
            with fs.open_output_stream(path) as f:       # one object, replaced whole
                f.write(pickle.dumps(saved))
        return len(settled)

    def running_trials_not_in(self, owned: dict[str, int]) -> list[Any]:
        """The Optuna study's RUNNING trials (FrozenTrial) that no Tune trial in `owned` owns."""
        from optuna.trial import TrialState
        owned_ids = set(owned.values())
        return [t for t in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t._trial_id not in owned_ids]

    def requeue(self, trial) -> None:
        """Fail an Optuna trial and queue it again with its parameters (grid point included):
        Optuna's own retry callback, called as its heartbeat check does."""
        import optuna
        from optuna.trial import TrialState
        with warnings.catch_warnings():          # renamed in Optuna 4.9 (and marked experimental)
            warnings.simplefilter("ignore")
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                            optuna.storages.RetryFailedTrialCallback)(max_retry=None)
        study = self._study
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))

    @functools.cached_property
    def _study(self):
        import optuna
        return optuna.load_study(study_name=self.study_id, storage=f"sqlite:///{self.optuna_db}")

    def _latest_searcher_state(self) -> dict | None:
        """The newest `searcher-state-*.pkl` Tune saved."""
        newest = self._newest("searcher-state-", ".pkl")
        if newest is None:
            return None
        fs, path = newest
        with fs.open_input_stream(path) as f:
            return pickle.loads(f.read())

    def _newest(self, prefix: str, suffix: str):
        """(filesystem, path) of the newest file `<prefix><time><suffix>` in the experiment
        directory (the name Tune picks the newest by), read through the filesystem layer Ray
        uses for its storage (local paths, s3://, gs://); None if there is none."""
        import pyarrow.fs
        path = self.experiment_path
        fs, root = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else \
            (pyarrow.fs.LocalFileSystem(), str(Path(path).absolute()))
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        except OSError:
            return None
        found = sorted(i.path for i in infos if i.base_name.startswith(prefix) and i.path.endswith(suffix))
        return (fs, found[-1]) if found else None


def _cloudpickle():
    import ray.cloudpickle
    return ray.cloudpickle


def requeue_orphaned_trials(plan: StudyPlan, parent_run_id: str | None = None,
                            close_run: Callable[[Any], None] | None = None) -> int:
    """Before a resume: Optuna trials the killed driver had asked for but Tune never saved.

    Tune saves its searcher after each step; a driver killed between the searcher's `ask`
    and that save leaves an Optuna trial RUNNING that no Tune trial owns. The resumed study
    would never finish it, and Optuna's GridSampler would hand out a duplicate instead. Each
    such trial is failed and queued again with its grid point (Optuna's own retry callback),
    so the resumed study runs every point exactly once. Returns the number of trials re-queued.

    The MLflow child runs still RUNNING of trials Tune did not save: a trial Optuna finished
    (the driver died between telling Optuna and closing the run) keeps its run, closed by
    `close_run` (the tracker's), as it has no retry to open another; any other such run is
    deleted (soft: `mlflow runs restore` undoes it), since its trial's retry opens its own.
    Tune's state files a killed copy left unreadable are set aside first."""
    state = TuneOptunaState(plan)
    unreadable = state.set_aside_unreadable()
    if unreadable:
        log.warning("study %s: set aside Tune state files a killed driver left unreadable: %s", plan.study_id,
                    ", ".join(unreadable))
    if not state.has_study():
        return 0
    if not state.has_experiment_state():
        owned: dict[str, int] = {}   # nothing for Tune to restore: every running Optuna trial is an orphan
    else:
        owned = state.tune_owned_trials()
        if owned is None:
            return 0
        saved = state.saved_trial_ids()
        if saved is not None:
            # A trial the searcher asked for but Tune's saved trial list lost (the two were
            # synced apart) is as orphaned as one the searcher never saved.
            owned = {tune_id: optuna_id for tune_id, optuna_id in owned.items() if tune_id in saved}
            lost = state.reconcile_search_counter(saved)
            if lost:
                log.warning("study %s: Tune's saved state counted %d trial(s) its trial list lacks (a driver "
                            "killed while saving); they are asked for again", plan.study_id, lost)
        if state.settle_finished(owned):
            log.info("study %s: trials Optuna had finished after Tune's last save resume without reporting "
                     "to Optuna again", plan.study_id)
    orphans = state.running_trials_not_in(owned)
    for trial in orphans:
        state.requeue(trial)
        point = trial.params or (f"grid point {trial.system_attrs['grid_id']}" if "grid_id" in trial.system_attrs
                                 else "before it had parameters")
        log.warning("study %s: Optuna trial %d was asked for but never saved by Tune; queued again (%s)",
                    plan.study_id, trial.number, point)
    if parent_run_id:
        _settle_child_runs(plan, state, parent_run_id, owned, close_run)
    return len(orphans)


def _settle_child_runs(plan: StudyPlan, state: TuneOptunaState, parent_run_id: str, owned: dict[str, int],
                       close_run: Callable[[Any], None] | None) -> None:
    """Close or delete the RUNNING child runs of trials Tune will not resume (see
    `requeue_orphaned_trials`)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient
    from ray.tune.utils.util import unflatten_dict
    client = MlflowClient(str(plan.base.tracking.uri))
    finished = state.finished_by_tune_trial()
    for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        tune_id = run.data.tags.get("ayt.trial_id")
        if tune_id in owned:
            continue
        done = finished.get(tune_id)
        if done is not None and close_run is not None:
            # As the Tune trial OptunaSearch built: its config is the Optuna trial's parameters.
            close_run(SimpleNamespace(trial_id=tune_id, config=unflatten_dict(dict(done.params)), last_result=None))
            log.warning("study %s: closed MLflow run %s of a trial Optuna finished before the driver stopped",
                        plan.study_id, run.info.run_id)
        else:
            client.delete_run(run.info.run_id)
            log.warning("study %s: deleted MLflow run %s of a trial Tune never saved", plan.study_id,
                        run.info.run_id)
