"""The study's one MLflow writer: a Ray Tune callback on the driver that keeps one child run
per trial under the study's parent run.

Ray's stock `MLflowLoggerCallback` logs against Tune's report counter, has no parent run and
creates a second run for a trial that `Tuner.restore` resumes. Here a child run is found again
by its stable key (study + Tune trial id) under its parent, named for a person by its axis
values (`b16-mfd-s0-57f9`) and tagged with the code version its trial reports (a resumed study
may run on newer code: `ayt.studies.engine.tune_backend` refuses that unless asked), and metrics are logged with
step = training iteration, skipping steps already stored, so a resumed or retried trial adds
only what is new.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from ayt.metrics import EVAL, HISTORY, VS_IMAGES, numeric_metrics
from ayt.provenance import CODE_VERSION, NODE_ID, NODE_IDS_TAG, RESUMED_FROM, RESUMED_FROM_TAG
from ayt.tracking import RunLogger, start_or_resume_run

STOPPED_TAG = "ayt.stopped_early"


class StudyTracker(Callback):
    """Child runs for trials; `describe(trial)` returns its `TrialRecord` (ayt.studies.engine.plan)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, study: str, describe: Callable[[Any], Any]):
        self.uri, self.experiment, self.parent_run_id, self.study = uri, experiment, parent_run_id, study
        self.describe = describe
        self.loggers: dict[str, RunLogger] = {}
        self.planned: dict[str, int] = {}
        self.run_dirs: dict[str, Path] = {}
        self.finished: set[str] = set()

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; MLflow clients stay behind.
        return {**self.__dict__, "loggers": {}, "finished": set()}

    def child(self, trial) -> RunLogger:
        logger = self.loggers.get(trial.trial_id)
        if logger is None:
            record = self.describe(trial)
            run_id, _ = start_or_resume_run(self.uri, self.experiment, record.key, record.params,
                                            parent_run_id=self.parent_run_id, display_name=record.label,
                                            tags={"ayt.study": self.study, "ayt.trial_id": trial.trial_id,
                                                  "ayt.entry": "ayt.studies", **record.tags}, reopen_finished=False)
            logger = self.loggers[trial.trial_id] = RunLogger(self.uri, run_id)
            if logger.client.get_run(run_id).info.status == "FINISHED":
                # Finished before the driver died but Tune had not saved that yet: the trial
                # restarts from its final checkpoint, trains nothing, and its run stays as it is.
                self.finished.add(trial.trial_id)
            self.planned[trial.trial_id], self.run_dirs[trial.trial_id] = record.planned_iterations, record.run_dir
        return logger

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Every metric that follows the naming convention (`ayt.metrics`), with step =
        training iteration; the points logged between two reports come in `history`."""
        step = result.get("iteration")
        if step is None:
            return
        logger = self.child(trial)
        if result.get(CODE_VERSION):
            logger.record_code(result[CODE_VERSION])       # the code its trial process runs
        self._record_node(trial, logger, result)
        for point_step, point in result.get(HISTORY) or []:
            logger.log_metrics(numeric_metrics(point), step=int(point_step))
        metrics = numeric_metrics(result)
        logger.log_metrics(metrics, step=int(step))
        images = result.get("images_seen")
        if images is not None:
            # The evaluations again against images seen, the x-axis that compares batch sizes fairly.
            logger.log_metrics({k + VS_IMAGES: v for k, v in metrics.items() if k.startswith(EVAL)},
                               step=int(images))

    def _record_node(self, trial, logger: RunLogger, result: dict[str, Any]) -> None:
        """The nodes a trial ran on, in order (`ayt.node_ids`), and the checkpoint iteration it
        resumed from after a failure (`ayt.resumed_from_iteration`): a preempted trial's record."""
        if result.get(NODE_ID):
            logger.append_to_tag(NODE_IDS_TAG, str(result[NODE_ID]))
        if result.get(RESUMED_FROM) is not None:
            logger.set_tags({RESUMED_FROM_TAG: int(result[RESUMED_FROM])})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.close_run(trial)

    def close_run(self, trial) -> None:
        """Finish a trial's child run (FINISHED, or KILLED when stopped before its planned
        iterations) with the files its trial wrote. `trial` needs `trial_id`, `config` and
        `last_result` (None when a resume closes a run whose driver was killed first)."""
        logger = self.child(trial)
        if trial.trial_id in self.finished:
            return
        # The last reported iteration: Tune's final result of a returned function may carry
        # no metrics, and a resumed driver has seen only part of the reports.
        done = max(int((trial.last_result or {}).get("iteration") or 0), logger.last_step.get("images_seen", 0))
        stopped = done < self.planned[trial.trial_id]
        logger.set_tags({STOPPED_TAG: str(stopped).lower(), "ayt.final_iteration": done})
        run_dir = self.run_dirs[trial.trial_id]
        if run_dir.is_dir():
            logger.log_artifacts([str(p) for p in sorted(run_dir.iterdir()) if p.is_file()])
        logger.finish("KILLED" if stopped else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        logger = self.child(trial)
        reason = error_line(trial)
        logger.set_tags({"ayt.failure": reason})
        logger.finish("FAILED")


def find_child_run(uri: str, parent_run_id: str, trial_id: str, timeout_s: float = 60.0) -> str | None:
    """The child run the driver's tracker keeps for Tune trial `trial_id`, as the trial's own
    process finds it (to log its system metrics there). The tracker makes it when Tune starts
    the trial, so the trial may look first: wait up to `timeout_s`; None if it never appears."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`ayt.trial_id` = '{trial_id}'"
    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def error_line(trial) -> str:
    """The last line of the trial's error file (the exception), for the MLflow tag."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
