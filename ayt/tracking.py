"""MLflow: one run per training run, found again by its stable name on resume, with
idempotent metric logging so a restarted worker never writes a step twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ayt.provenance import CODE_VERSIONS_TAG, code_version, provenance_tags, tag_list

RUN_NAME_TAG = "ayt.run_name"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live next to the database (MLflow's default is ./mlruns
    under whatever directory the process happens to run in); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant
# panel); a model-training experiment opens on its runs table, which is what a study needs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment `name`, created (and tagged as model training) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:       # made by an older version
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


def find_run(client: MlflowClient, experiment_id: str, run_name: str, parent_run_id: str | None = None):
    """The existing run with this stable name (and parent), or None."""
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=2)
    return runs[0] if runs else None


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
                        tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                        reopen_finished: bool = True, display_name: str | None = None) -> tuple[str, bool]:
    """Return (run_id, resumed). A new run gets its params and tags; an old one is reopened
    (a FINISHED one only if `reopen_finished`: a study's completed trial stays as it was) and
    given the params it lacks.
    `run_name` finds the run again; `display_name` (default: the same) is what the UI shows."""
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    existing = find_run(client, experiment_id, run_name, parent_run_id)
    if existing is not None:
        if reopen_finished or existing.info.status != "FINISHED":
            client.update_run(existing.info.run_id, status="RUNNING")
        # A process killed between creating the run and logging its params left some out.
        _log_params(client, existing.info.run_id,
                    {k: v for k, v in params.items() if k not in existing.data.params})
        return existing.info.run_id, True
    shown = display_name or run_name
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": shown, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=shown, tags=all_tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id, False


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):          # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]


class RunLogger:
    """Logs metrics of one run, skipping any (key, step) at or before what is already stored."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.last_step: dict[str, int] = {}
        run = self.client.get_run(run_id)
        self.tags = dict(run.data.tags)
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self.last_step[key] = max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        import time
        now = timestamp_ms or int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and step > self.last_step.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                self.last_step[m.key] = m.step

    def append_to_tag(self, key: str, value: str, with_tags: dict[str, str] | None = None) -> None:
        """Add `value` to the ordered list tag `key` unless it is already the last (`tag_list`),
        setting `with_tags` beside it when it is added: what a run records each time it moves
        on to other code or another node, kept across a resumed driver (the run's tags)."""
        seen = tag_list(self.tags, key)
        if seen and seen[-1] == value:
            return
        self.set_tags({**(with_tags or {}), key: ",".join([*seen, value])})

    def record_code(self, version: str | None = None) -> None:
        """Tag the run with the code version that trains it (default: this process's); a run
        resumed on other code keeps every version it ran on, in order (`ayt.code_versions`)."""
        version = version or code_version()
        self.append_to_tag(CODE_VERSIONS_TAG, version, provenance_tags(version))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifacts(self, paths: Iterable[str], artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
