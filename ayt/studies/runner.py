"""The study runner's public names, from the modules that hold them (kept so that code, and
Tune experiments pickled before the split, that name `ayt.studies.runner` still work):

    CLI overrides -> plan: study block and every trial config composed and validated, no Ray yet
                     (ayt.studies.engine.plan; per-study hooks: `study_hook`)
      -> Ray (+ preflight) -> shared artifacts built once per distinct setting
      -> Tuner(function trainable -> in-process trial or TorchTrainer, OptunaSearch, optional ASHA)
         (ayt.studies.engine.tune_backend)
      -> StudyTracker (driver): parent MLflow run + one child per trial (ayt.studies.engine.tracker)
      -> report (markdown + PNGs + CSV) under out_dir/<study>/, logged to the parent run

`resume=true` on the same out_dir and study config restores the Tuner: finished trials stay
finished, unfinished ones continue from their Ray Train checkpoints, and the tracker finds
their MLflow child runs again instead of creating new ones; what Tune and Optuna saved is
read and repaired first (ayt.studies.engine.resume). The command line is ayt.studies.engine.cli.
"""

from ayt.studies.engine.cli import USAGE, main, study_main, study_names
from ayt.studies.engine.plan import (STUDY_HOOKS, TRIAL_DRIVER_RESOURCES, StudyPlan, TrialRecord, plan_study, split_argv,
                                     study_hook)
from ayt.studies.engine.resume import TuneOptunaState, requeue_orphaned_trials
from ayt.studies.engine.schema import TRIAL_BACKENDS, volatile_keys
from ayt.studies.engine.tune_backend import (TRIAL_RUNNERS, StudyError, check_code_version, max_concurrent_trials,
                                             optuna_searcher, prebuild_artifacts, run_study, run_trial,
                                             run_tune_then_repeat)

VOLATILE_STUDY_KEYS = volatile_keys()      # derived from the schema (ayt/studies/engine/schema.py)

__all__ = ["STUDY_HOOKS", "TRIAL_BACKENDS", "TRIAL_DRIVER_RESOURCES", "TRIAL_RUNNERS", "USAGE", "VOLATILE_STUDY_KEYS",
           "StudyError", "StudyPlan", "TrialRecord", "TuneOptunaState", "check_code_version", "main",
           "max_concurrent_trials", "optuna_searcher", "plan_study", "prebuild_artifacts", "requeue_orphaned_trials",
           "run_study", "run_trial", "run_tune_then_repeat", "split_argv", "study_hook", "study_main", "study_names"]
