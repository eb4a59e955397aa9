"""A study on the rehearsal cluster, submitted as the README's cluster recipe submits it
(`ray job submit ... -- env AYT_STORAGE=... AYT_TRACKING_URI=... python -m ayt.studies.<name>
scaling=rehearsal ...`), watched from outside as an operator would watch it: the dashboard's
state API (nodes, placement groups, actors), the provider's record of launches and
terminations, and the MLflow server. Optionally one worker node is reclaimed mid-trial, as a
spot instance is. Afterwards: how long trials waited for a node, how long idle nodes took to
go, and what the reclaimed trial cost (`figures`).
"""

from __future__ import annotations

import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ayt.cluster.rehearsal import RehearsalCluster, worker_type
from ayt.environ import environ
from ayt.provenance import NODE_IDS_TAG, RESUMED_FROM_TAG, tag_list

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EVAL_KEY = "eval/fid_1step"        # logged with every report of a study trial (each with its checkpoint)


@dataclass
class Rehearsal:
    """What one rehearsal saw; times are wall-clock seconds (time.time())."""

    study: str
    entrypoint: str
    job_id: str = ""
    status: str = ""
    submitted_at: float = 0.0
    finished_at: float = 0.0
    zero_at: float | None = None              # every worker node gone
    idle_timeout_s: float = 0.0
    reclaim: dict[str, Any] | None = None     # node_id, at, run_id, checkpoint_iteration (_at), reported_before_reclaim, ...
    nodes: list[dict[str, Any]] = field(default_factory=list)             # state API, at the end
    placement_groups: dict[str, dict[str, Any]] = field(default_factory=dict)   # every one seen
    trial_nodes: dict[str, list[str]] = field(default_factory=dict)       # trial actor id -> node ids seen
    events: list[dict[str, Any]] = field(default_factory=list)            # the provider's record
    trials: list[dict[str, Any]] = field(default_factory=list)            # MLflow child runs (trial_runs)
    max_alive_workers: int = 0
    logs: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "figures": figures(self)}


def study_entrypoint(python: str, study: str, argv: list[str], env: dict[str, str]) -> str:
    """The job's command, as in the README: `env K=V ... python -m ayt.studies.<study> ...`."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    return shlex.join(["env", *assignments, python, "-m", f"ayt.studies.{study}", "scaling=rehearsal", *argv])


def prebuild(study: str, argv: list[str], driver_env: dict[str, str]) -> int:
    """Build the study's shared artifacts into the cache before submitting it (the README's
    recipe builds them once, as a job of their own, before the study): the rehearsal then
    measures the cluster, not the first build. Returns the number of distinct settings."""
    from ayt.studies.runner import plan_study, prebuild_artifacts
    with environ(driver_env):                         # what scaling=rehearsal reads (AYT_*)
        return prebuild_artifacts(plan_study(study, [*argv, "scaling=rehearsal"]), progress=False)


def rehearse(cluster: RehearsalCluster, study: str, argv: list[str], env: dict[str, str], tracking_uri: str,
             experiment: str, python: str, preempt: bool = True, timeout: float = 900.0,
             poll: float = 0.5, log=print) -> Rehearsal:
    """Submit the study as a Ray job, watch it, reclaim one worker node mid-trial if `preempt`,
    then wait until the autoscaler has removed every idle worker node."""
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(cluster.dashboard_url)
    record = Rehearsal(study=study, entrypoint=study_entrypoint(python, study, argv, env),
                       idle_timeout_s=float(cluster.config["idle_timeout_minutes"]) * 60)
    record.submitted_at = time.time()
    record.job_id = client.submit_job(entrypoint=record.entrypoint)
    log(f"ayt: rehearsal: job {record.job_id} submitted: {record.entrypoint}")
    most = int(cluster.config["available_node_types"][worker_type(cluster.config)]["max_workers"])
    deadline = time.monotonic() + timeout
    while True:
        _observe(cluster, record)
        status = str(client.get_job_status(record.job_id).value)
        if status in TERMINAL:
            record.status, record.finished_at = status, time.time()
            break
        # Reclaim once the cluster has scaled up to its limit, under a trial between two
        # checkpoints (well after its last report, as a reclaim at a random moment falls).
        if record.reclaim is not None and "followed" not in record.reclaim:
            _follow_reclaimed(tracking_uri, record.reclaim)
        if preempt and record.reclaim is None and record.max_alive_workers >= most:
            target = _trial_to_reclaim(tracking_uri, experiment, time.time())
            if target is not None:
                record.reclaim = target
                target["at"] = cluster.reclaim(target["node_id"])
                log(f"ayt: rehearsal: reclaimed node {target['node_id'][-5:]} under trial run {target['run_id']} "
                    f"{target['at'] - target['checkpoint_at']:.1f} s after its checkpoint at iteration "
                    f"{target['checkpoint_iteration']}")
        if time.monotonic() > deadline:
            client.stop_job(record.job_id)
            record.status, record.finished_at = "TIMEOUT", time.time()
            break
        time.sleep(poll)
    if record.reclaim is not None and "followed" not in record.reclaim:
        _follow_reclaimed(tracking_uri, record.reclaim, final=True)
    record.logs = client.get_job_logs(record.job_id)
    log(f"ayt: rehearsal: job {record.status} after {record.finished_at - record.submitted_at:.0f} s; "
        f"waiting for idle worker nodes to go (idle timeout {record.idle_timeout_s:.0f} s)")
    zero_deadline = time.monotonic() + record.idle_timeout_s + 180
    while time.monotonic() < zero_deadline:
        _observe(cluster, record)
        if not [n for n in record.nodes if n["state"] == "ALIVE" and not n["is_head_node"]]:
            record.zero_at = time.time()
            break
        time.sleep(poll)
    # Ray counts a node dead once its raylet is gone; the provider records the termination
    # when its graceful stop of the node's other processes returns, seconds later.
    record.events = cluster.events()
    events_deadline = time.monotonic() + 60
    while record.zero_at is not None and _unended(record.events) and time.monotonic() < events_deadline:
        time.sleep(poll)
        record.events = cluster.events()
    record.trials = trial_runs(tracking_uri, experiment)
    return record


def _unended(events: list[dict[str, Any]]) -> set[str]:
    """Worker nodes the provider launched and has not yet recorded terminated or reclaimed."""
    ended = {e["node_id"] for e in events if e["event"] in ("terminated", "reclaimed")}
    return {e["node_id"] for e in events if e["event"] == "launched"} - ended


def _observe(cluster: RehearsalCluster, record: Rehearsal) -> None:
    """One look at the cluster: nodes, placement groups (kept: Tune removes them when a trial
    ends), and where the trial actors run."""
    try:
        record.nodes = cluster.nodes()
        for pg in cluster.placement_groups():
            record.placement_groups[pg["placement_group_id"]] = pg
        for actor in cluster.actors():
            if actor.get("class_name") == "ImplicitFunc" and actor.get("node_id"):    # Tune's function trainable
                seen = record.trial_nodes.setdefault(actor["actor_id"], [])
                if actor["node_id"] not in seen:
                    seen.append(actor["node_id"])
    except OSError:                 # the dashboard busy for a moment: look again next time
        return
    alive = [n for n in record.nodes if n["state"] == "ALIVE" and not n["is_head_node"]]
    record.max_alive_workers = max(record.max_alive_workers, len(alive))


# A reclaim this long after a trial's last report falls while it trains towards the next one:
# past the moment Tune registers the report's checkpoint. (A function trainable's
# `tune.report` uploads the checkpoint, then blocks until the driver has logged the result,
# asked the trial actor for the checkpoint in a separate `save` call, registered it, and
# called `train` again; only then does the next iteration start. A node lost inside that
# window, a fraction of a second, is restored from the checkpoint before: Tune never knew
# of the newer one.)
RECLAIM_AFTER_REPORT_S = 2.0


def _trial_to_reclaim(uri: str, experiment: str, now: float) -> dict[str, Any] | None:
    """A running trial between two checkpoints (checkpoints come with evaluations in a study):
    it has reported one, has another to go, and its last report is `RECLAIM_AFTER_REPORT_S`
    old, so it is training past it. Its node, run, last checkpoint (iteration and when the
    driver logged it)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=50):
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags or not tags.get(NODE_IDS_TAG) or RESUMED_FROM_TAG in tags:
            continue
        evals = sorted(client.get_metric_history(run.info.run_id, EVAL_KEY), key=lambda m: m.step)
        planned = int(float(run.data.params.get("training.iterations", 0) or 0))
        every = int(float(run.data.params.get("training.eval_every", 0) or 0))
        if not evals or not every or evals[-1].step + every > planned:
            continue                              # no checkpoint yet, or none to go
        at = evals[-1].timestamp / 1000
        if now - at < RECLAIM_AFTER_REPORT_S:
            continue
        return {"node_id": tags[NODE_IDS_TAG].split(",")[-1], "run_id": run.info.run_id,
                "checkpoint_iteration": evals[-1].step, "checkpoint_at": at, "every": every}
    return None


def _follow_reclaimed(uri: str, reclaim: dict[str, Any], final: bool = False) -> None:
    """Once the reclaimed trial's next attempt reports (its run gets the resumed tag), or the
    study has ended (`final`: a trial that never resumed from a checkpoint has no tag): what
    the driver had heard from the attempt that died when its node went: its last report
    (`reported_before_reclaim`, normally the checkpoint it was picked at) and how long before
    the reclaim that report came (`since_report_s`: the training the reclaim threw away)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    try:
        if RESUMED_FROM_TAG not in client.get_run(reclaim["run_id"]).data.tags and not final:
            return
        evals = client.get_metric_history(reclaim["run_id"], EVAL_KEY)
    except Exception:  # noqa: BLE001 - the tracking server busy for a moment: look again next time
        return
    before = [m for m in evals if m.timestamp / 1000 <= reclaim["at"]]
    if before:
        last = max(before, key=lambda m: m.step)
        reclaim.update(reported_before_reclaim=last.step,
                       since_report_s=round(reclaim["at"] - last.timestamp / 1000, 1))
    reclaim["followed"] = True


# --- figures ------------------------------------------------------------------------------

def _pg_times(pg: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
    """(pending since, placed at, node) of a placement group, from its scheduling stats."""
    stats = pg.get("stats") or {}
    since = stats.get("creation_request_received_ns")
    since = float(since) / 1e9 if since else None
    latency = stats.get("end_to_end_creation_latency_us")
    placed = since + float(latency) / 1e6 if since and latency else None
    nodes = [b.get("node_id") for b in pg.get("bundles") or [] if b.get("node_id")]
    return since, placed, nodes[0] if nodes else None


def figures(record: Rehearsal) -> dict[str, Any]:
    """The numbers the README reports, from what the rehearsal saw."""
    workers = {n["node_id"]: n for n in record.nodes if not n["is_head_node"]}
    start = {nid: n["start_time_ms"] / 1000 for nid, n in workers.items() if n.get("start_time_ms")}
    end = {nid: n["end_time_ms"] / 1000 for nid, n in workers.items() if n.get("end_time_ms")}
    launching = {e["node_id"]: e["time"] for e in record.events if e["event"] == "launching"}
    waits, placed_after = [], []
    for pg in record.placement_groups.values():
        since, placed, node = _pg_times(pg)
        if since is None or node not in start or start[node] < since:
            continue                              # placed on a node that was already up
        waits.append(start[node] - since)         # pending trial -> its node joined
        if placed is not None:
            placed_after.append(placed - since)   # pending trial -> its resources held
    boots = [start[nid] - t for nid, t in launching.items() if nid in start]
    out: dict[str, Any] = {
        "worker_nodes_launched": len([e for e in record.events if e["event"] == "launched"]),
        "launches_failed": len([e for e in record.events if e["event"] == "launch_failed"]),
        # Instances the provider ran at once, and nodes Ray counted alive at once: Ray counts a
        # reclaimed node until its health checks fail (~15 s), beside its replacement.
        "max_instances_at_once": max_instances(record.events),
        "max_alive_in_ray_at_once": record.max_alive_workers,
        "pending_to_join_s": _summary(waits),
        "pending_to_placed_s": _summary(placed_after),
        "launch_to_join_s": _summary(boots),
        "study_s": round(record.finished_at - record.submitted_at, 1),
        "idle_timeout_s": record.idle_timeout_s,
    }
    out.update(_scale_down(record))
    if record.reclaim:
        out["preemption"] = _preemption(record, end)
    return out


def max_instances(events: list[dict[str, Any]]) -> int:
    """The most worker instances the provider ran at once (launched, not yet terminated or reclaimed)."""
    running = most = 0
    for event in sorted(events, key=lambda e: e["time"]):
        running += {"launched": 1, "terminated": -1, "reclaimed": -1}.get(event["event"], 0)
        most = max(most, running)
    return most


def node_idle_since(record: Rehearsal) -> dict[str, float]:
    """When each worker node's last trial ended (its MLflow run's end; a trial's last node is
    the one it ended on), or, for a node that ran none (launched for a trial that found
    another node free first), when it joined."""
    idle = {e["node_id"]: e["time"] for e in record.events if e["event"] == "launched"}
    ran = set()
    for trial in record.trials:
        if trial["end"] and trial["nodes"]:
            node = trial["nodes"][-1]
            idle[node] = max(idle[node], trial["end"]) if node in ran else trial["end"]
            ran.add(node)
    return idle


def _scale_down(record: Rehearsal) -> dict[str, Any]:
    terminated = {e["node_id"]: e["time"] for e in record.events if e["event"] == "terminated"}
    idle = node_idle_since(record)
    ends = [t["end"] for t in record.trials if t["end"]]
    out: dict[str, Any] = {"idle_to_terminated_s": _summary([t - idle[n] for n, t in terminated.items() if n in idle])}
    if ends and terminated:
        out["last_trial_end_to_zero_s"] = round(max(terminated.values()) - max(ends), 1)
    return out


def _preemption(record: Rehearsal, end: dict[str, float]) -> dict[str, Any]:
    reclaim = record.reclaim
    at = reclaim.get("at")
    out: dict[str, Any] = {"node": reclaim["node_id"], "checkpoint_iteration": reclaim["checkpoint_iteration"]}
    if at and reclaim["node_id"] in end:
        out["reclaim_to_node_dead_s"] = round(end[reclaim["node_id"]] - at, 1)   # Ray noticing the node gone
    later = [p for p in (_pg_times(pg)[1] for pg in record.placement_groups.values()) if p and at and p > at]
    if later:
        out["reclaim_to_trial_placed_again_s"] = round(min(later) - at, 1)
    trials = {t["run_id"]: t for t in record.trials}
    trial = trials.get(reclaim["run_id"])
    if "since_report_s" in reclaim:
        out.update(reported_before_reclaim=reclaim["reported_before_reclaim"], training_lost_s=reclaim["since_report_s"])
    gaps = [b[1] - a[1] for t in record.trials if t["run_id"] != reclaim["run_id"]
            for a, b in zip(t.get("reports") or [], (t.get("reports") or [])[1:])]
    if gaps:
        out["other_trials_report_gap_s"] = round(statistics.median(gaps), 1)   # training between two checkpoints
    if trial is not None:
        out.update(resumed_from_iteration=trial["resumed_from"], nodes=trial["nodes"])
        others = [t["end"] - t["start"] for r, t in trials.items() if r != reclaim["run_id"] and t["end"]]
        if trial["end"] and others:
            out["trial_s"] = round(trial["end"] - trial["start"], 1)
            out["other_trials_median_s"] = round(statistics.median(others), 1)
            out["extra_s"] = round(out["trial_s"] - out["other_trials_median_s"], 1)
    return out


def trial_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Each trial's MLflow child run: id, status, start and end (s), the nodes it ran on, the
    checkpoint iteration it resumed from (None: never restored), and when the driver logged
    each of its reports (`reports`: [iteration, s], one per evaluation and checkpoint)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=200) if found else []
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "start": r.info.start_time / 1000, "end": r.info.end_time / 1000 if r.info.end_time else None,
             "nodes": tag_list(r.data.tags, NODE_IDS_TAG),
             "resumed_from": int(r.data.tags[RESUMED_FROM_TAG]) if RESUMED_FROM_TAG in r.data.tags else None,
             "reports": sorted([m.step, m.timestamp / 1000] for m in client.get_metric_history(r.info.run_id, EVAL_KEY))}
            for r in runs if "mlflow.parentRunId" in r.data.tags]


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "min": round(min(values), 1), "median": round(statistics.median(values), 1),
            "max": round(max(values), 1)}


# --- the whole stack: servers, cluster -------------------------------------------------------

@dataclass
class Stack:
    """The servers and the cluster of one rehearsal, and what a driver needs to use them."""

    root: Any                                   # Path: logs, out_dir, the local storage
    cluster: RehearsalCluster
    tracking_uri: str
    storage: str                                # AYT_STORAGE: s3://ayt/rehearsal or a local path
    driver_env: dict[str, str]                  # AYT_* for the study command (the README's `env ...`)
    cluster_env: dict[str, str]                 # what every process of the cluster runs with (S3 access)
    services: dict[str, Any] = field(default_factory=dict)


def rehearsal_stack(root, temp_dir, config: dict[str, Any], tracking: str = "postgresql", storage: str = "s3",
                    cache_dir=None, log=print):
    """Start what the cluster recipe needs, on 127.0.0.1: PostgreSQL (`tracking=postgresql`;
    `sqlite`: a file under `root`), an S3-compatible server (`storage=s3`; `local`: a directory),
    `mlflow server` on them, and the rehearsal cluster; a context manager that stops all of it."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from ayt.cluster.services import start_mlflow, start_postgres, start_s3

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def stack():
        with contextlib.ExitStack() as stop:
            services: dict[str, Any] = {}
            cluster_env: dict[str, str] = {}
            if storage == "s3":
                services["s3"] = stop.enter_context(start_s3(root))
                cluster_env.update(services["s3"].env)
                store, artifacts = "s3://ayt/rehearsal", "s3://ayt/mlartifacts"
            else:
                store, artifacts = str(root / "storage"), str(root / "mlartifacts")
            if tracking == "postgresql":
                services["postgresql"] = stop.enter_context(start_postgres(root))
                backend = services["postgresql"].url
            else:
                backend = f"sqlite:///{root / 'mlflow.db'}"
            with ThreadPoolExecutor(2) as pool:          # the two slow starts, side by side
                mlflow = pool.submit(start_mlflow, root, backend, artifacts, env=cluster_env)
                cluster = pool.submit(RehearsalCluster.start, config, temp_dir, env=cluster_env)
                for started in (mlflow, cluster):
                    with contextlib.suppress(Exception):
                        stop.callback(started.result().stop)
                services["mlflow"], started_cluster = mlflow.result(), cluster.result()
            log(f"ayt: rehearsal: cluster {started_cluster.address} (dashboard {started_cluster.dashboard_url}), "
                f"MLflow {services['mlflow'].url} on {backend.split(':')[0]}, storage {store}")
            driver_env = {"AYT_STORAGE": store, "AYT_TRACKING_URI": services["mlflow"].url,
                          "AYT_OUT_DIR": str(root / "out"), "AYT_CACHE": str(Path(cache_dir or root / "out" / "cache"))}
            yield Stack(root, started_cluster, services["mlflow"].url, store, driver_env, cluster_env, services)

    return stack()
