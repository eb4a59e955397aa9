"""Checks run on the driver before a study starts trials, each failure naming the field to fix.

On a cluster a wrong storage path, a tracking server that is down or GPUs that no node can
provide otherwise show up late: after minutes of autoscaling, inside a trial, or as a placement
group that waits forever. These checks take seconds and stop at the first problem.
"""

from __future__ import annotations

import base64
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ayt.config import PATH_FIELDS
from ayt.errors import ConfigError

TRACKING_TIMEOUT_S = 5.0  # per HTTP request to the tracking server
# Written by `ray up` on the head node: the autoscaler's view of the node types.
RAY_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Where else a head keeps it (the local rehearsal's head, ayt/cluster/rehearsal.py, sets it).
AUTOSCALER_CONFIG_ENV = "AYT_AUTOSCALER_CONFIG"
# Endpoints that answer on an MLflow server without side effects, tried in order.
_MLFLOW_PROBES = ("/health", "/api/2.0/mlflow/experiments/search?max_results=1")


class PreflightError(ConfigError):
    """A precondition of the study fails. ``str(err)`` is one line: ``field: problem``."""


def preflight(
    cfg: DictConfig | Mapping[str, Any],
    cluster_resources: Mapping[str, float] | None = None,
    autoscaler_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Check storage, tracking server and GPU capacity; return one line per check.

    Run it after ``ayt.config.load_config`` (types and ranges) and, to see a running cluster,
    after ``ray.init``.

    ``cluster_resources`` are a running cluster's totals (``ray.cluster_resources()``);
    ``autoscaler_config`` is a Ray cluster launcher config (``available_node_types``). When
    both are None they are discovered: the running Ray (if initialised), ``~/ray_bootstrap_config.yaml``
    on a ``ray up`` head, or the node groups the autoscaler reported to Ray.

    With ``scaling.use_gpu`` and a discovered, running Ray, one task on a GPU node reports
    whether torch can use CUDA there (``_check_worker_cuda``).

    Raises ``PreflightError`` (naming the field) at the first failed check.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    lines = [_check_scaling(cfg)]
    lines.append(_check_writable("ray.storage_path", cfg.ray.get("storage_path"), cfg, "ray"))
    # The artifact cache is read with plain file APIs (torch.load, torch-fidelity): no URIs.
    lines.append(_check_writable("cache_dir", cfg.get("cache_dir"), cfg, "cache", uri_ok=False))
    lines.append(_check_tracking(cfg.tracking.get("uri")))
    may_autoscale_unseen = False
    discovered = cluster_resources is None and autoscaler_config is None
    if discovered:
        cluster_resources, autoscaler_config = _discover_cluster()
        # A cluster we joined may have an autoscaler whose node types we cannot see.
        may_autoscale_unseen = autoscaler_config is None and _joins_cluster(cfg)
    capacity = _check_capacity(cfg, cluster_resources, autoscaler_config, may_autoscale_unseen)
    if cfg.scaling.use_gpu and discovered and _ray_running():
        lines.append(_check_worker_cuda(cfg, cluster_resources, autoscaler_config))
    return lines + [capacity]


def _ray_running() -> bool:
    import sys
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _check_worker_cuda(cfg: DictConfig, cluster_resources: Mapping[str, float] | None,
                       autoscaler_config: Mapping[str, Any] | None) -> str:
    """Ray counts a node's GPUs whether or not its torch can use them: a task holding one
    worker's GPUs asks torch there (`ayt.gpu`). It waits for a GPU node the autoscaler starts
    (up to ray.worker_start_timeout_s) only where the autoscaler's node types are visible."""
    from ayt.gpu import GPUUnavailableError, check_cuda, probe_cuda
    gpus = worker_bundle(cfg).get("GPU", 0.0)
    up_now = float((cluster_resources or {}).get("GPU", 0.0)) >= gpus
    if not up_now and autoscaler_config is None:
        return "scaling.use_gpu: no GPU node is up yet (not checked here; each worker checks at its start)"
    timeout = float(cfg.ray.worker_start_timeout_s)
    report = probe_cuda(cfg, gpus, timeout)
    if report is None:
        return (f"scaling.use_gpu: no GPU node took the probe within ray.worker_start_timeout_s={timeout:g} s "
                "(not checked here; each worker checks at its start)")
    try:
        return check_cuda(report, cfg)
    except GPUUnavailableError as err:
        raise PreflightError(err.field, err.message) from None


def check_locations(cfg: DictConfig, uses_ray: bool = True) -> list[str]:
    """Every path and address in the config, checked before any work (no Ray, no MLflow run):
    out_dir, the artifact cache, Ray's storage, the tracking store or server, `ray.address`
    and the files the config names. Each failure is one line naming the field (exit code 2)."""
    lines = [_check_writable("out_dir", cfg.get("out_dir"), cfg, "", uri_ok=False),
             _check_writable("cache_dir", cfg.get("cache_dir"), cfg, "cache", uri_ok=False),
             _check_writable("ray.storage_path", cfg.ray.get("storage_path"), cfg, "ray")]
    uri = cfg.tracking.get("uri")
    if uri and str(uri).startswith("sqlite:///"):
        lines.append(_check_writable("tracking.uri", str(Path(str(uri)[len("sqlite:///"):]).parent), cfg, ""))
    else:
        lines.append(_check_tracking(uri))
    if uses_ray:
        lines.append(_check_ray_address(cfg.ray.get("address")))
        lines.append(_check_scaling(cfg))
        lines.append(_check_capacity_before_ray(cfg))
    for field in FILE_FIELDS:
        value = OmegaConf.select(cfg, field)
        if value and not Path(str(value)).is_file():
            raise PreflightError(field, f"no such file: {value!r}")
    return lines


def local_ray_resources(cfg: DictConfig) -> dict[str, float]:
    """What a Ray started on this machine will offer, before it starts: the CPUs `ray.init`
    counts (cgroup limits included) and the CUDA GPUs; any other resource a worker asks for
    is left unchecked (as if plentiful)."""
    try:
        from ray._private.utils import get_num_cpus   # what ray.init counts; private API
        cpus = float(get_num_cpus())
    except Exception:  # absent or changed: the CPUs this process may run on
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import torch
    offered = {"CPU": cpus, "GPU": float(torch.cuda.device_count())}
    return {**{k: 1e9 for k in worker_bundle(cfg)}, **offered}


def _check_capacity_before_ray(cfg: DictConfig) -> str:
    """The capacity check `preflight` makes once Ray runs, made before it starts (a dry run
    stops here): a Ray already running in this process or a cluster joined, as far as it is
    visible without connecting; a Ray this command would start, from this machine's resources."""
    import sys
    ray = sys.modules.get("ray")
    if (ray is not None and ray.is_initialized()) or _joins_cluster(cfg):
        resources, autoscaler = _discover_cluster()
        return _check_capacity(cfg, resources, autoscaler, autoscaler is None and _joins_cluster(cfg))
    return _check_capacity(cfg, local_ray_resources(cfg), None, running_name="this machine")


# Weight, statistics and checkpoint files a config may name (each must exist before anything
# starts): the path fields ayt.config declares as files.
FILE_FIELDS = tuple(key for key, kind in PATH_FIELDS.items() if kind == "file")
RAY_CONNECT_TIMEOUT_S = 3.0


def _check_ray_address(address: str | None) -> str:
    """`ray.address` must answer now: a GCS address (host:port or ray://host:port) that
    refuses connections would otherwise make `ray.init` retry for minutes."""
    if address in (None, "", "local"):
        return "ray.address: a local Ray starts on this machine"
    address = str(address)
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            address = env
        else:
            current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
            if not current.is_file():
                raise PreflightError("ray.address", "is 'auto' but no Ray runs on this machine "
                                     "(start one with `ray start --head`, or use ray.address=null)")
            address = current.read_text().strip()
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError("ray.address", f"must be null, 'auto', 'local', HOST:PORT or ray://HOST:PORT, got {address!r}")
    import socket
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise PreflightError("ray.address", f"nothing answers at {address} ({_one_line(err)}); start the "
                             "cluster first or use ray.address=null for a local Ray") from None
    return f"ray.address: {address} answers"


def _joins_cluster(cfg: DictConfig) -> bool:
    """ray.address null or "local" starts a Ray on this machine; anything else joins a cluster."""
    return cfg.ray.get("address") not in (None, "local")


# --- config -------------------------------------------------------------------------------

def worker_bundle(cfg: DictConfig) -> dict[str, float]:
    """Resources of one Ray Train worker, as Ray Train computes them (ScalingConfig)."""
    bundle = {k: float(v) for k, v in (cfg.scaling.get("resources_per_worker") or {}).items() if v}
    if cfg.scaling.use_gpu:
        bundle.setdefault("GPU", 1.0)  # use_gpu alone means one GPU per worker
    elif not bundle:
        bundle = {"CPU": 1.0}
    return bundle


def _check_scaling(cfg: DictConfig) -> str:
    """Types and ranges are ``ayt.config.validate_config``'s job; this is what Ray adds."""
    if not cfg.scaling.use_gpu and (cfg.scaling.get("resources_per_worker") or {}).get("GPU", 0) > 0:
        # Ray Train's ScalingConfig refuses this combination; say it before Ray does.
        raise PreflightError("scaling.use_gpu", "is false but scaling.resources_per_worker asks for GPUs")
    return f"scaling: {cfg.scaling.num_workers} worker(s) per trial, each {_fmt(worker_bundle(cfg))}"


# --- storage ------------------------------------------------------------------------------

def _probe_local(path: str) -> None:
    """Write (and remove) a probe file in the directory, or in its nearest existing ancestor
    if it does not exist yet: the check leaves nothing behind."""
    directory = Path(path)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    probe = directory / f".ayt-preflight-{uuid.uuid4().hex}"
    probe.write_bytes(b"ok")
    probe.unlink()


def _probe_pyarrow(uri: str) -> None:
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(uri)
    filesystem.create_dir(root, recursive=True)
    probe = f"{root.rstrip('/')}/.ayt-preflight-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(probe) as out:
        out.write(b"ok")
    filesystem.delete_file(probe)


# URI scheme -> probe; "" is a plain path. Any other scheme goes through pyarrow (s3, gs, hdfs, file).
_STORAGE_PROBES: dict[str, Callable[[str], None]] = {"": _probe_local}


def _scheme(location: str) -> str:
    scheme = urllib.parse.urlparse(location).scheme
    return scheme if len(scheme) > 1 else ""  # "C:\\..." is a path, not a URI


def resolve_location(value: str | None, cfg: DictConfig, default_subdir: str) -> str:
    """A storage location as the study will use it: null -> <out_dir>/<subdir>, paths absolute."""
    if value is None:
        value = os.path.join(str(cfg.out_dir), default_subdir) if default_subdir else str(cfg.out_dir)
    value = str(value)
    if _scheme(value):
        return value
    return str(Path(value).expanduser().absolute())


def _check_writable(field: str, value: str | None, cfg: DictConfig, default_subdir: str,
                    uri_ok: bool = True) -> str:
    location = resolve_location(value, cfg, default_subdir)
    if _scheme(location) and not uri_ok:
        raise PreflightError(field, f"must be a path (a mount every node shares: NFS, EFS, a PVC), got {location!r}")
    probe = _STORAGE_PROBES.get(_scheme(location), _probe_pyarrow)
    try:
        probe(location)
    except (OSError, ValueError) as err:  # pyarrow's errors subclass these
        raise PreflightError(
            field,
            f"cannot write {location!r} from the driver ({type(err).__name__}: {_one_line(err)}); "
            "give a writable location that every node sees "
            + ("(s3://, gs:// or a shared mount)" if uri_ok else "(a shared mount)"),
        ) from err
    shared = _joins_cluster(cfg) and not _scheme(location)
    note = " (a path: every node must see it as the same shared mount)" if shared else ""
    return f"{field}: {location} writable from the driver{note}"


# --- tracking -----------------------------------------------------------------------------

def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (its documented environment variables)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_tracking(uri: str | None) -> str:
    if uri is None:
        return "tracking.uri: sqlite under out_dir, written by the driver only"
    if _scheme(uri) not in ("http", "https"):
        return f"tracking.uri: {uri} (not a server; not checked)"
    problem = "no answer"
    for path in _MLFLOW_PROBES:
        request = urllib.request.Request(uri.rstrip("/") + path, headers=_auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=TRACKING_TIMEOUT_S) as response:
                if 200 <= response.status < 300:
                    return f"tracking.uri: MLflow server answers at {uri}"
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            problem = f"HTTP {err.code} on {path.split('?')[0]}"
        except (urllib.error.URLError, OSError) as err:
            problem = _one_line(getattr(err, "reason", err))
            break  # nothing listens: the second endpoint cannot answer either
    raise PreflightError(
        "tracking.uri",
        f"no MLflow server answers at {uri} ({problem}); start one "
        "(`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri ...`) reachable from the driver",
    )


# --- GPUs and capacity --------------------------------------------------------------------

@dataclass(frozen=True)
class _NodeGroup:
    """Nodes of one kind: ``count`` of them (inf: unbounded), ``resources`` each (None: unknown)."""

    name: str
    resources: Mapping[str, float] | None
    count: float
    autoscaled: bool  # counts against the autoscaler's global max_workers


def _node_groups(autoscaler_config: Mapping[str, Any]) -> tuple[list[_NodeGroup], float]:
    """Node types of a Ray launcher config and its global ``max_workers`` (inf if absent).

    Missing per-type ``max_workers`` default as in Ray's ``fill_node_type_min_max_workers``:
    the global value for worker types, 0 extra nodes for the head type.
    """
    global_max = autoscaler_config.get("max_workers")
    global_max = math.inf if global_max is None or global_max < 0 else float(global_max)
    head = autoscaler_config.get("head_node_type")
    groups = []
    for name, spec in (autoscaler_config.get("available_node_types") or {}).items():
        resources = spec.get("resources") or None  # {}: auto-detected from the instance type at launch
        count = spec.get("max_workers", 0 if name == head else global_max)
        count = math.inf if count is None or count < 0 else float(count)
        if name == head:
            groups.append(_NodeGroup(name, resources, 1.0, autoscaled=False))
        if count > 0:
            groups.append(_NodeGroup(name, resources, count, autoscaled=True))
    return groups, global_max


def _slots(resources: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many worker bundles one node holds."""
    return min(math.floor(float(resources.get(k, 0)) / v + 1e-9) for k, v in bundle.items())


def _max_placeable(groups: list[_NodeGroup], global_max: float, bundle: Mapping[str, float]) -> float:
    """Most workers placeable at once; autoscaled nodes fill the global max, best types first."""
    total, budget = 0.0, global_max
    known = [g for g in groups if g.resources is not None]
    for group in sorted(known, key=lambda g: -_slots(g.resources, bundle)):
        slots = _slots(group.resources, bundle)
        if slots <= 0:
            continue
        nodes = min(group.count, budget) if group.autoscaled else group.count
        if group.autoscaled:
            budget -= nodes
        total += nodes * slots
    return total


def _check_capacity(
    cfg: DictConfig,
    cluster_resources: Mapping[str, float] | None,
    autoscaler_config: Mapping[str, Any] | None,
    may_autoscale_unseen: bool = False,
    running_name: str = "running cluster",
) -> str:
    bundle, workers = worker_bundle(cfg), int(cfg.scaling.num_workers)
    sources: list[tuple[str, list[_NodeGroup], float]] = []
    if cluster_resources is not None:
        # Totals only: the running cluster is judged as if it were one node.
        running = {k: float(v) for k, v in cluster_resources.items()}
        sources.append((running_name, [_NodeGroup(running_name, running, 1.0, False)], math.inf))
    if autoscaler_config is not None:
        groups, global_max = _node_groups(autoscaler_config)
        sources.append(("autoscaler", groups, global_max))
    if not sources:
        return "resources: no running cluster or autoscaler config to check against (not checked)"

    groups = [g for _, gs, _ in sources for g in gs]
    unknown = [g.name for g in groups if g.resources is None]
    known = [g for g in groups if g.resources is not None]
    fitting = [g for g in known if _slots(g.resources, bundle) >= 1]
    best = max(_max_placeable(gs, cap, bundle) for _, gs, cap in sources)
    offered = ", ".join(f"{g.name} {_fmt(g.resources)}" for g in known) or "none"
    if unknown and best < workers:
        return f"resources: node types {unknown} have auto-detected resources (not checked)"
    if may_autoscale_unseen and best < workers:
        return (f"resources: the running cluster cannot place {workers} x {_fmt(bundle)} yet and its "
                "autoscaler config is not visible here; trials wait for nodes up to ray.worker_start_timeout_s")
    if not fitting:
        gpus = bundle.get("GPU", 0.0)
        if gpus and not any(float(g.resources.get("GPU", 0)) >= gpus for g in known):
            raise PreflightError(
                "scaling.use_gpu",
                f"{_num(gpus)} GPU(s) per worker requested, but no node (running or autoscalable) "
                f"offers that many (node types: {offered}); set scaling.use_gpu=false or add a GPU node type",
            )
        raise PreflightError(
            "scaling.resources_per_worker",
            f"no single node offers {_fmt(bundle)} (node types: {offered})",
        )
    if best < workers:
        gpu_note = f" = {_num(workers * bundle['GPU'])} GPUs" if "GPU" in bundle else ""
        raise PreflightError(
            "scaling.num_workers",
            f"{workers} workers x {_fmt(bundle)}{gpu_note} exceed what the cluster can ever provide: "
            f"at most {_num(best)} workers fit (node types: {offered}); lower it or raise max_workers",
        )
    parallel = "unbounded" if math.isinf(best) else _num(best // workers)
    return (f"resources: {workers} x {_fmt(bundle)} fit ({' + '.join(s for s, _, _ in sources)}); "
            f"at most {parallel} trial(s) at once")


def max_workers_at_once(cfg: DictConfig, cluster_resources: Mapping[str, float] | None = None,
                        autoscaler_config: Mapping[str, Any] | None = None) -> float | None:
    """The most Ray Train workers of `cfg`'s bundle placeable at once: the running nodes, or the
    nodes the autoscaler may add (worker types from 0 to max_workers), whichever holds more;
    None when neither is visible. On an autoscaling cluster whose workers start at 0 the
    running nodes alone hold none: sized by them, a study would run one trial at a time and
    the autoscaler would never add a second node."""
    if cluster_resources is None and autoscaler_config is None:
        cluster_resources, autoscaler_config = _discover_cluster()
    bundle = worker_bundle(cfg)
    best = None
    if cluster_resources is not None:
        running = {k: float(v) for k, v in cluster_resources.items()}
        best = _max_placeable([_NodeGroup("running cluster", running, 1.0, False)], math.inf, bundle)
    if autoscaler_config is not None:
        groups, global_max = _node_groups(autoscaler_config)
        if all(g.resources is not None for g in groups):      # auto-detected resources: unknown
            best = max(best or 0.0, _max_placeable(groups, global_max, bundle))
    return best


def _discover_cluster() -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """The running Ray's totals and the autoscaler's node types, where this process can see them."""
    cluster_resources = autoscaler_config = None
    bootstrap = Path(os.environ.get(AUTOSCALER_CONFIG_ENV) or RAY_BOOTSTRAP_CONFIG).expanduser()
    if bootstrap.is_file():  # `ray up` head: the launcher config with defaults filled in
        import yaml

        autoscaler_config = yaml.safe_load(bootstrap.read_text())
    try:
        import ray
    except ImportError:
        return None, autoscaler_config
    if ray.is_initialized():
        cluster_resources = dict(ray.cluster_resources())
        if autoscaler_config is None:
            autoscaler_config = _reported_node_groups()
    return cluster_resources, autoscaler_config


def _reported_node_groups() -> dict[str, Any] | None:
    """Node groups an autoscaler reported to the GCS (what Ray Train's own check reads); private API."""
    try:
        from ray._private.state import state

        reported = state.get_cluster_config()
    except Exception:  # private API: absent or changed means "not visible", not a failure
        return None
    if reported is None or not reported.node_group_configs:
        return None
    return {
        "max_workers": -1,
        "available_node_types": {
            g.name: {"resources": dict(g.resources), "max_workers": g.max_count}
            for g in reported.node_group_configs
        },
    }


# --- formatting ---------------------------------------------------------------------------

def _num(x: float) -> str:
    return "inf" if math.isinf(x) else (str(int(x)) if float(x).is_integer() else f"{x:g}")


def _fmt(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"}
    return "{" + ", ".join(f"{k}: {_num(float(v))}" for k, v in sorted(shown.items())) + "}"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
