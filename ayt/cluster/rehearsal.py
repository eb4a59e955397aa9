"""The autoscaled cluster, rehearsed on one machine: a Ray head started with Ray's real
autoscaler (v1, what `ray up` runs on a head) whose node provider starts and stops worker
nodes as processes here (`ayt.cluster.provider`), configured by `conf/cluster/local-rehearsal.yaml`
(the shape of `conf/cluster/ray-cluster.yaml`: a head with CPU 0, one worker type from 0 to N).

The cluster is started and stopped by its own address and temp dir, never with `ray stop`
(which stops every Ray on the machine): every process it runs, worker nodes included, has
its temp dir in its command line, and `stop()` signals exactly those, by pid. Everything talks
over 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray pick the loopback address for
every node, as it does on a laptop).
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ayt.cluster.provider import RECLAIM_DIR, read_events
from ayt.cluster.services import LOOPBACK, ServiceError, free_port, venv_executable, wait_http
from ayt.errors import ConfigError
from ayt.preflight import AUTOSCALER_CONFIG_ENV

PROVIDER = "ayt.cluster.provider.RehearsalNodeProvider"
HEAD_TYPE = "ray.head.default"          # the fake provider tags its head with this type
STATE_FILE = "rehearsal.json"
CLUSTER_ENV = "AYT_REHEARSAL_CLUSTER"   # every process of a rehearsal cluster has it: its temp dir
# A Unix socket path holds at most 107 bytes; Ray puts its sockets at
# <temp dir>/session_<date>_<time>_<pid>/sockets/plasma_store (about 64 bytes after the temp dir).
MAX_TEMP_DIR = 40


def default_config_path() -> Path:
    return Path(str(files("ayt.conf").joinpath("cluster", "local-rehearsal.yaml")))


# --- the config ---------------------------------------------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_rehearsal_config(path: str | os.PathLike | None = None, max_workers: int | None = None,
                          idle_timeout_minutes: float | None = None) -> dict[str, Any]:
    """The rehearsal's launcher config, overridden and checked before anything starts: our
    rules first (each a one-line ConfigError naming the field), then Ray's own schema and
    `prepare_config`/`validate_config`, as the autoscaler will read it."""
    path = Path(path) if path is not None else default_config_path()
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError("cluster.config", f"cannot read {path} ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError("cluster.config", f"{path} is not YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError("cluster.config", f"{path} must hold a mapping (a Ray cluster launcher config)")
    types = config.get("available_node_types")
    if not isinstance(types, dict) or HEAD_TYPE not in types:
        raise ConfigError("available_node_types", f"must map node type names to specs, with the head as {HEAD_TYPE!r}")
    workers = [name for name in types if name != HEAD_TYPE]
    if len(workers) != 1:
        raise ConfigError("available_node_types", f"must hold exactly one worker node type besides {HEAD_TYPE!r}, "
                          f"got {workers}")
    worker = workers[0]
    if max_workers is not None:
        config["max_workers"] = max_workers
        if isinstance(types[worker], dict):
            types[worker]["max_workers"] = max_workers
    if idle_timeout_minutes is not None:
        config["idle_timeout_minutes"] = idle_timeout_minutes
    _check_rehearsal(config, worker)
    _check_with_ray(config)
    return config


def worker_type(config: dict[str, Any]) -> str:
    return next(name for name in config["available_node_types"] if name != HEAD_TYPE)


def _check_rehearsal(config: dict[str, Any], worker: str) -> None:
    provider = config.get("provider") or {}
    if provider.get("type") != "external" or provider.get("module") != PROVIDER:
        raise ConfigError("provider", f"must be {{type: external, module: {PROVIDER}}} (the rehearsal's node "
                          f"provider), got {provider!r}")
    if config.get("head_node_type") != HEAD_TYPE:
        raise ConfigError("head_node_type", f"must be {HEAD_TYPE!r} (Ray's fake multi-node provider names the "
                          f"head so), got {config.get('head_node_type')!r}")
    head = config["available_node_types"][HEAD_TYPE]
    head_cpu = ((head or {}).get("resources") or {}).get("CPU")
    if head_cpu != 0:
        raise ConfigError(f"available_node_types.{HEAD_TYPE}.resources.CPU",
                          f"must be 0 (the head runs no training, as in ray-cluster.yaml), got {head_cpu!r}")
    spec = config["available_node_types"][worker]
    if not isinstance(spec, dict):
        raise ConfigError(f"available_node_types.{worker}", "must be a mapping (resources, min_workers, max_workers)")
    prefix = f"available_node_types.{worker}"
    cpu = (spec.get("resources") or {}).get("CPU")
    if not _integer(cpu) or cpu < 1:
        raise ConfigError(f"{prefix}.resources.CPU", f"must be an integer >= 1 (what one trial reserves), got {cpu!r}")
    low, high = spec.get("min_workers", 0), spec.get("max_workers")
    if not _integer(low) or low < 0:
        raise ConfigError(f"{prefix}.min_workers", f"must be an integer >= 0, got {low!r}")
    if not _integer(high) or high < 1:
        raise ConfigError(f"{prefix}.max_workers", f"must be an integer >= 1 (worker nodes at most), got {high!r}")
    if low > high:
        raise ConfigError(f"{prefix}.min_workers", f"must be <= max_workers ({high}), got {low}")
    total = config.get("max_workers")
    if not _integer(total) or total < high:
        raise ConfigError("max_workers", f"must be an integer >= {prefix}.max_workers ({high}), got {total!r}")
    idle = config.get("idle_timeout_minutes")
    if not _number(idle) or idle <= 0:
        raise ConfigError("idle_timeout_minutes", f"must be a number of minutes > 0 (idle worker nodes are removed "
                          f"after it), got {idle!r}")
    speed = config.get("upscaling_speed", 1.0)
    if not _number(speed) or speed <= 0:
        raise ConfigError("upscaling_speed", f"must be a number > 0, got {speed!r}")


def _check_with_ray(config: dict[str, Any]) -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as err:
        field = ".".join(str(p) for p in err.absolute_path) or "cluster.config"
        raise ConfigError(field, " ".join(err.message.split())) from None
    except (ValueError, RuntimeError) as err:
        raise ConfigError("cluster.config", " ".join(str(err).split())) from None


# --- the cluster --------------------------------------------------------------------------

def rehearsal_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every process of the rehearsal cluster runs with (the nodes the autoscaler starts
    inherit it from the head)."""
    return {
        "RAY_FAKE_CLUSTER": "1",                    # the fake provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",        # the autoscaler looks every second (default 5)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # every node on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        **(extra or {}),
    }


@dataclass
class RehearsalCluster:
    """A running (or stopped) rehearsal cluster, known by its temp dir."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    config: dict[str, Any]

    @property
    def address(self) -> str:
        """The GCS address: `ray.address=` for a driver, RAY_ADDRESS for `ray status`."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs are submitted here (`ray job submit --address ...`); the state API answers here."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def state_dir(self) -> Path:
        return self.temp_dir / "provider"

    @classmethod
    def start(cls, config: dict[str, Any], temp_dir: str | os.PathLike, env: dict[str, str] | None = None,
              object_store_bytes: int = 200 * 1024 * 1024, timeout: float = 120.0) -> "RehearsalCluster":
        """`ray start --head` with the autoscaler, every port chosen free on 127.0.0.1."""
        temp_dir = Path(temp_dir).absolute()
        if len(str(temp_dir)) > MAX_TEMP_DIR:
            raise ConfigError("cluster.temp_dir", f"must be at most {MAX_TEMP_DIR} characters (Ray's socket paths "
                              f"under it must fit 107 bytes), got {str(temp_dir)!r}")
        if (temp_dir / STATE_FILE).exists():
            raise ConfigError("cluster.temp_dir", f"{temp_dir} already holds a rehearsal cluster "
                              "(`python -m ayt.cluster down --temp-dir ...` first)")
        temp_dir.mkdir(parents=True, exist_ok=True)
        cluster = cls(temp_dir, free_port(), free_port(), copy.deepcopy(config))
        cluster.state_dir.mkdir(parents=True, exist_ok=True)
        autoscaling = copy.deepcopy(config)
        autoscaling["provider"].update(gcs_address=cluster.address, state_dir=str(cluster.state_dir))
        for spec in autoscaling["available_node_types"].values():
            spec.setdefault("node_config", {})
        worker = autoscaling["available_node_types"][worker_type(autoscaling)]
        worker["resources"].setdefault("object_store_memory", object_store_bytes)
        config_file = temp_dir / "autoscaling.yaml"
        config_file.write_text(yaml.safe_dump(autoscaling, sort_keys=False))
        head_cpus = int(config["available_node_types"][HEAD_TYPE]["resources"]["CPU"])
        cmd = [venv_executable("ray"), "start", "--head", f"--node-ip-address={LOOPBACK}",
               f"--port={cluster.gcs_port}", f"--num-cpus={head_cpus}", "--num-gpus=0",
               f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp_dir}",
               f"--autoscaling-config={config_file}", "--include-dashboard=true",
               f"--dashboard-host={LOOPBACK}", f"--dashboard-port={cluster.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats"]
        (temp_dir / STATE_FILE).write_text(json.dumps({"gcs_port": cluster.gcs_port,
                                                       "dashboard_port": cluster.dashboard_port,
                                                       "config": config}, indent=1))
        log = temp_dir / "ray-start.log"
        # The head's processes (the job's study driver among them) find the autoscaler's node
        # types here, as a `ray up` head finds ~/ray_bootstrap_config.yaml (ayt.preflight).
        env = {**(env or {}), AUTOSCALER_CONFIG_ENV: str(config_file), CLUSTER_ENV: str(temp_dir),
               # The autoscaler's Prometheus port is fixed (44217) unless set: another cluster may hold it.
               "AUTOSCALER_METRIC_PORT": str(free_port())}
        with open(log, "wb") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **rehearsal_env(env)}, timeout=timeout)
        try:
            if done.returncode != 0:
                raise ServiceError(f"ray start --head failed (exit {done.returncode}): "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            wait_http(cluster.dashboard_url + "/api/version", None, log, "Ray dashboard", timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, temp_dir: str | os.PathLike) -> "RehearsalCluster":
        """The cluster a `python -m ayt.cluster up` left running in `temp_dir`."""
        temp_dir = Path(temp_dir).absolute()
        try:
            state = json.loads((temp_dir / STATE_FILE).read_text())
        except OSError:
            raise ConfigError("cluster.temp_dir", f"no rehearsal cluster in {temp_dir} (no {STATE_FILE})") from None
        return cls(temp_dir, int(state["gcs_port"]), int(state["dashboard_port"]), state["config"])

    # --- what is running ------------------------------------------------------------------

    def _state_api(self, resource: str, **params: Any) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"limit": 10000, "detail": 1, "timeout": 10, **params})
        with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/{resource}?{query}", timeout=20) as r:
            body = json.loads(r.read())
        return body["data"]["result"]["result"]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows, alive or dead (state API: node_id, state, is_head_node,
        start_time_ms, end_time_ms, resources_total, ...)."""
        return self._state_api("nodes")

    def alive_workers(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]

    def actors(self) -> list[dict[str, Any]]:
        return self._state_api("actors")

    def placement_groups(self) -> list[dict[str, Any]]:
        return self._state_api("placement_groups")

    def events(self) -> list[dict[str, Any]]:
        """What the provider did: launched, terminated (by the autoscaler), reclaimed."""
        return read_events(self.state_dir)

    def worker_nodes(self) -> list[str]:
        """The provider's ids of the worker nodes running now (what `reclaim` takes), oldest first."""
        alive: dict[str, None] = {}
        for event in self.events():
            if event["event"] == "launched":
                alive[event["node_id"]] = None
            elif event["event"] in ("terminated", "reclaimed"):
                alive.pop(event["node_id"], None)
        return list(alive)

    def reclaim(self, node_id: str, timeout: float = 30.0) -> float:
        """Take the worker node away as a spot reclaim does (the provider SIGKILLs all of it);
        returns when the provider did it (wall-clock time)."""
        seen = len(self.events())
        (self.state_dir / RECLAIM_DIR / node_id).write_text("")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events()[seen:]:
                if event["node_id"] == node_id and event["event"] in ("reclaimed", "reclaim_ignored"):
                    if event["event"] == "reclaim_ignored":
                        raise ServiceError(f"node {node_id} is not a worker node the provider runs")
                    return float(event["time"])
            time.sleep(0.2)
        raise ServiceError(f"the provider did not reclaim {node_id} within {timeout:.0f} s (is the autoscaler up? "
                           f"see {self.temp_dir}/session_latest/logs/monitor.*)")

    def wait_for(self, condition, timeout: float, what: str, poll: float = 0.5):
        """Poll `condition()` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ServiceError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    # --- stopping -------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process of this cluster (GCS, raylets, dashboard, autoscaler, workers, the
        job's driver, and the nodes the autoscaler started): each inherits from `ray start` the
        variable CLUSTER_ENV=<its temp dir>, which no other process has. (Command lines do not
        do: workers rename themselves `ray::IDLE`, and a shell that merely names the temp dir
        would match.)"""
        marker = f"{CLUSTER_ENV}={self.temp_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:                  # gone, or not ours to read
                continue
        return found

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM this cluster's processes, SIGKILL what is left after `timeout`; returns how
        many there were. The state file goes too, so the temp dir can hold a new cluster."""
        pids = self.pids()
        total = len(pids)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break
        (self.temp_dir / STATE_FILE).unlink(missing_ok=True)
        return total


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[-1].split()[0] != "Z"     # a zombie is dead, only not reaped


def ray_status(cluster: RehearsalCluster) -> str:
    """`ray status` of this cluster (the autoscaler's view: nodes, pending demands)."""
    done = subprocess.run([venv_executable("ray"), "status", f"--address={cluster.address}"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **rehearsal_env()})
    return done.stdout + done.stderr


def python() -> str:
    return sys.executable
