"""A study's trials as its MLflow runs hold them (the source of truth after any resume), loaded
once for the report and the protocol: every child run of the study's parent run with its axis
values, status, artifact metadata, the code that trained it, and every metric history that
follows the naming convention (`ayt.metrics`): all of `eval/…` and `train/…`, step =
iteration. Nothing here names a metric: one that a trial logs reaches the report's sections
(and curves.csv) as logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from ayt.eval.metrics import MIN, at_least_as_good, best, direction
from ayt.metrics import EVAL, TRAIN, TRAIN_SECONDS, VS_IMAGES, short
from ayt.provenance import CODE_VERSIONS_TAG, tag_list
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.engine.group import Group

DIVERGED_RISE = 0.10   # an FID more than 10% above its first evaluation, to the end, is a divergence
# (a higher-is-better metric: more than 10% below it)
# A final FID more than this times the run's best is a divergence too (higher-is-better: under
# its best divided by this): the first-evaluation rule
# misses a run whose first FID is high (an untrained net's), e.g. critical_batch_sweep's
# 1223, 335, 1537, …, 915. Twice is a chosen margin, not a measured one: wide enough for an
# evaluation's noise, and a run that ends there has lost most of what it had reached.
DIVERGED_FROM_BEST = 2.0
Curve = list[tuple[int, float]]       # [(iteration, value)], by iteration


def history_keys(logged: Iterable[str]) -> list[str]:
    """The metrics among `logged` whose histories a trial carries: every `eval/…` and `train/…`
    metric, step = iteration (their `…_vs_images` copies, step = images seen, are left out)."""
    return sorted(k for k in logged if k.startswith((EVAL, TRAIN)) and not k.endswith(VS_IMAGES))


@dataclass
class Trial:
    run_id: str
    name: str
    axes: dict[str, str]            # swept values (seed included), as MLflow stores params
    batch_size: int
    status: str
    stopped_early: bool
    curves: dict[str, Curve] = field(default_factory=dict)   # metric -> its history (`history_keys`)
    train_seconds: float | None = None
    artifacts: dict[str, str] = field(default_factory=dict)   # artifact.* params: cache keys, their metrics
    failure: str | None = None      # the reason a failed trial gave (ayt.failure tag)
    code_versions: tuple[str, ...] = ()   # the code that trained it, in order (more than one: resumed on new code)
    started_ms: int | None = None   # its run's start (ms since the epoch): the order a search proposed it in

    @property
    def seed(self) -> str:
        return self.axes.get("seed", self.axes.get("_seed", "?"))

    @property
    def group(self) -> Group:
        return Group.of((k, v) for k, v in self.axes.items() if k != "seed")

    def eval_keys(self) -> list[str]:
        """The evaluation histories this trial has (`eval/…`), in name order."""
        return sorted(k for k in self.curves if k.startswith(EVAL))

    def final(self, key: str) -> float:
        return self.curves[key][-1][1] if self.curves.get(key) else math.nan

    def score(self, key: str, endpoint: Endpoint) -> float:
        """The trial's one number at the study's endpoint (ayt/studies/protocols/endpoint.py): what every
        verdict, ranking and choice of the study reads."""
        return endpoint.score(self.curves.get(key) or [])

    def best(self, key: str) -> float:
        """The best value of the curve, in the metric's direction (ayt/eval/metrics.py)."""
        return best((v for _, v in self.curves.get(key, [])), key)

    def divergence(self, key: str) -> str | None:
        """Why this trial counts as diverged, or None. Diverged: it failed on a non-finite loss,
        its FID rose above its first evaluation by more than DIVERGED_RISE and stayed there
        (the last two evaluations, or the last one when there are only two), or it ended more
        than DIVERGED_FROM_BEST times above its best. For a higher-is-better metric the same
        rules run mirrored: fell below its first evaluation, ended under its best / 2."""
        if self.failure and ("non-finite" in self.failure.lower() or "nan" in self.failure.lower()):
            return self.failure.split(":", 1)[-1].strip()[:160] or "non-finite loss"
        curve = [v for _, v in self.curves.get(key, [])]
        if len(curve) < 2:
            return None
        tail = curve[-2:] if len(curve) > 2 else curve[-1:]
        if direction(key) != MIN:
            return _fell(key, curve, tail)
        if all(v > curve[0] * (1 + DIVERGED_RISE) for v in tail):
            return f"{short(key)} rose from {curve[0]:.1f} (first evaluation) to {curve[-1]:.1f} and stayed above it"
        top = min(curve)
        if curve[-1] > top * DIVERGED_FROM_BEST:
            peak = max(curve[curve.index(top):])
            rose = f"to {peak:.1f} and ended at {curve[-1]:.1f}" if peak > curve[-1] else f"to {peak:.1f} at the end"
            return f"{short(key)} rose from its best {top:.1f} {rose}, more than {DIVERGED_FROM_BEST:g}× its best"
        return None

    def first_reaching(self, key: str, target: float) -> int | None:
        """First evaluated iteration whose value reaches the target: at or below it (FID), at or
        above it for a higher-is-better metric (None: never)."""
        return next((s for s, v in self.curves.get(key, []) if at_least_as_good(v, target, key)), None)


def _fell(key: str, curve: list[float], tail: list[float]) -> str | None:
    """`Trial.divergence`'s rules mirrored for a higher-is-better metric (precision, recall)."""
    if all(v < curve[0] * (1 - DIVERGED_RISE) for v in tail):
        return f"{short(key)} fell from {curve[0]:.3g} (first evaluation) to {curve[-1]:.3g} and stayed below it"
    top = max(curve)
    if curve[-1] < top / DIVERGED_FROM_BEST:
        return f"{short(key)} fell from its best {top:.3g} to {curve[-1]:.3g}, under 1/{DIVERGED_FROM_BEST:g} of its best"
    return None


def load_trials(uri: str, parent_run_id: str) -> list[Trial]:
    """The study's trials (child runs of `parent_run_id`), by group then seed."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    histories = _histories(client, runs)
    trials = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        axes = {k[len("axis."):].replace("__", "."): v for k, v in sorted(params.items()) if k.startswith("axis.")}
        if "seed" not in axes:
            axes["seed"] = params.get("seed", "?")
        curves = {key: [(m.step, m.value) for m in sorted(histories(run.info.run_id, key), key=lambda m: m.step)]
                  for key in history_keys(run.data.metrics)}
        trials.append(Trial(run.info.run_id, run.info.run_name, axes, int(params.get("batch_size", 0)),
                            run.info.status, tags.get("ayt.stopped_early") == "true", curves,
                            run.data.metrics.get(TRAIN_SECONDS),
                            {k[len("artifact."):]: v for k, v in params.items() if k.startswith("artifact.")},
                            failure=tags.get("ayt.failure"),
                            code_versions=tuple(tag_list(tags, CODE_VERSIONS_TAG)),
                            started_ms=run.info.start_time))
    return sorted(trials, key=lambda t: (t.group.sort_key(), t.seed))


BULK_RUNS = 500     # run ids per bulk history query (well under sqlite's bound on query parameters)


def _histories(client, runs):
    """`(run_id, key) -> that metric's history` for the runs' `history_keys`, in MLflow's order
    (timestamp, step, value): one query per metric and BULK_RUNS runs where the store answers
    bulk queries (the sqlite/SQL store; a 1,000-trial study loads in seconds, not minutes),
    else one `get_metric_history` per run and metric."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    if bulk is None:
        return client.get_metric_history
    wanted: dict[str, list[str]] = {}
    for run in runs:
        for key in history_keys(run.data.metrics):
            wanted.setdefault(key, []).append(run.info.run_id)
    found: dict[tuple[str, str], list] = {}
    for key, run_ids in wanted.items():
        for start in range(0, len(run_ids), BULK_RUNS):
            for m in bulk(run_ids[start:start + BULK_RUNS], key, max_results=2**62):
                found.setdefault((m.run_id, key), []).append(m)
    return lambda run_id, key: found.get((run_id, key), [])
