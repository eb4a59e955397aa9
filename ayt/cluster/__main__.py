"""`python -m ayt.cluster`: the autoscaled cluster, rehearsed on this machine.

    python -m ayt.cluster rehearse [OPTIONS] [STUDY_OVERRIDE ...]
        PostgreSQL + an S3-compatible server + `mlflow server` + the rehearsal cluster on
        127.0.0.1, the README's cluster recipe submitted as a Ray job, one worker node
        reclaimed mid-trial, idle nodes left to scale to zero; prints what it measured and
        writes <out-dir>/rehearsal.json. Everything is stopped at the end.
    python -m ayt.cluster up [OPTIONS]          the cluster alone, left running (prints its addresses)
    python -m ayt.cluster reclaim --temp-dir DIR NODE_ID    take a worker node away (a spot reclaim)
    python -m ayt.cluster status --temp-dir DIR             `ray status` of it
    python -m ayt.cluster down --temp-dir DIR               stop it (its own processes only)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ayt.errors import ConfigError

# The rehearsal's study: the README's recipe on a budget that fits a laptop: 2 seeds of one
# smoke-preset trial (2 trials at once need 2 worker nodes), 300 iterations with a checkpoint
# at each of 3 evaluations, so a trial can be reclaimed between two and resume from one. (At
# 60 iterations two reports of a trial came 2-5 s apart on 2 cores: too close to land a
# reclaim between them, an autoscaler round after the pick; at 300, about 10 s.)
STUDY = "batch_size_sweep"
STUDY_NAME = "rehearsal"
STUDY_ARGS = [f"study.name={STUDY_NAME}", "study.axes.batch_size=[16]", "study.axes.loss=[pseudo_huber]",
              "study.seeds=[0,1]", "study.preset=smoke", "fid.num_samples=100", "study.budget.amount=4800",
              "study.budget.evals=3", "progress=false",
              "tracking.system_metrics_interval_s=2"]   # several samples in a trial of ~30 s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ayt.cluster", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def cluster_options(p):
        p.add_argument("--config", help="launcher config (default: conf/cluster/local-rehearsal.yaml)")
        p.add_argument("--max-workers", type=int, help="worker nodes at most (overrides max_workers)")
        p.add_argument("--idle-timeout-minutes", type=float, help="overrides idle_timeout_minutes")
        p.add_argument("--temp-dir", help="the cluster's Ray temp dir (at most 40 characters; default: a new "
                       "/tmp/ayt-rehearsal-*)")

    rehearse = sub.add_parser("rehearse", help="the cluster recipe against a rehearsal cluster, measured")
    cluster_options(rehearse)
    rehearse.add_argument("--out-dir", default="runs/rehearsal", help="logs, out_dir, rehearsal.json")
    rehearse.add_argument("--cache-dir", help="artifact cache (default: <out-dir>/out/cache)")
    rehearse.add_argument("--tracking", choices=("postgresql", "sqlite"), default="postgresql")
    rehearse.add_argument("--storage", choices=("s3", "local"), default="s3")
    rehearse.add_argument("--no-preempt", action="store_true", help="do not reclaim a node mid-trial")
    rehearse.add_argument("overrides", nargs="*", help="study overrides, after the rehearsal's own")
    up = sub.add_parser("up", help="start a rehearsal cluster and leave it running")
    cluster_options(up)
    for name in ("reclaim", "status", "down"):
        p = sub.add_parser(name)
        p.add_argument("--temp-dir", required=True)
        if name == "reclaim":
            p.add_argument("node_id", help="a worker node's id, as `status` lists them")
    return parser


def _temp_dir(value: str | None) -> str:
    return value or tempfile.mkdtemp(prefix="ayt-rehearsal-", dir="/tmp")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ayt.cluster.rehearsal import RehearsalCluster, load_rehearsal_config, ray_status
    try:
        if args.command in ("rehearse", "up"):
            config = load_rehearsal_config(args.config, args.max_workers, args.idle_timeout_minutes)
        if args.command == "up":
            cluster = RehearsalCluster.start(config, _temp_dir(args.temp_dir))
            print(f"ayt: rehearsal cluster up: ray.address={cluster.address}\n"
                  f"  dashboard / jobs: {cluster.dashboard_url}  (ray job submit --address {cluster.dashboard_url} -- ...)\n"
                  f"  stop: python -m ayt.cluster down --temp-dir {cluster.temp_dir}")
            return 0
        if args.command == "rehearse":
            return _rehearse(args, config)
        cluster = RehearsalCluster.attach(args.temp_dir)
    except ConfigError as err:
        print(f"ayt: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "status":
        print(ray_status(cluster))
        nodes = cluster.worker_nodes()
        print("worker nodes (python -m ayt.cluster reclaim --temp-dir DIR NODE_ID takes one): "
              + (", ".join(nodes) if nodes else "none"))
    elif args.command == "reclaim":
        cluster.reclaim(args.node_id)
        print(f"ayt: node {args.node_id} reclaimed")
    else:
        print(f"ayt: stopped {cluster.stop()} processes of the cluster in {cluster.temp_dir}")
    return 0


def _rehearse(args, config) -> int:
    from ayt.cluster.rehearse import figures, prebuild, rehearse, rehearsal_stack
    out = Path(args.out_dir).absolute()
    study_args = [*STUDY_ARGS, *args.overrides]
    with rehearsal_stack(out, _temp_dir(args.temp_dir), config, tracking=args.tracking, storage=args.storage,
                         cache_dir=args.cache_dir) as stack:
        print("ayt: rehearsal: building the shared artifacts first (cached after the first time)", flush=True)
        prebuild(STUDY, study_args, stack.driver_env)
        record = rehearse(stack.cluster, STUDY, study_args, stack.driver_env, stack.tracking_uri,
                          STUDY_NAME, sys.executable, preempt=not args.no_preempt, timeout=3600)
    (out / "rehearsal.json").write_text(json.dumps(record.to_dict(), indent=1, default=str))
    print(json.dumps({"status": record.status, "command": "python -m ayt.cluster rehearse " + " ".join(sys.argv[2:]),
                      **figures(record)}, indent=1))
    if record.status != "SUCCEEDED":
        print(record.logs[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
