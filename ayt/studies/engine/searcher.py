"""The study's Tune searcher: Ray Tune's OptunaSearch, which also writes on each Optuna trial
the Tune trial it was asked for.

Tune's saved state maps its trials to Optuna's, but a driver killed before that state reached
storage leaves only the Optuna study and the MLflow child runs (tagged with their Tune trial).
With the Tune trial on the Optuna trial, a resume tells a child whose trial Optuna finished
(close the run) from one whose trial it queues again (delete the run): see
`ayt.studies.engine.resume.requeue_orphaned_trials`.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

TUNE_TRIAL_ATTR = "ayt.tune_trial_id"     # Optuna user attribute: the Tune trial id


class StudySearch(OptunaSearch):
    """OptunaSearch whose Optuna trials name their Tune trial (`TUNE_TRIAL_ATTR`)."""

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        asked = self._ot_trials.get(trial_id)        # OptunaSearch's Tune id -> Optuna trial
        if config is not None and asked is not None:
            asked.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config
