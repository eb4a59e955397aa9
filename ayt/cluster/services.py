"""The servers a cluster run talks to, started on 127.0.0.1 for a rehearsal (and the tests):
PostgreSQL for MLflow's tracking store, an S3-compatible object store (moto's server) for
Ray's checkpoints and Tune's state, and an `mlflow server` on top of both.

Each runs in a process group (session) of its own and is stopped by its pid, whatever else
runs on the machine; none of them is ever found or stopped by name.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LOOPBACK = "127.0.0.1"
# Credentials of the local object store; nothing else accepts them. Every process that
# touches s3:// (driver, trials, the MLflow server) gets these in its environment, together
# with the endpoint: boto3 and pyarrow read AWS_ENDPOINT_URL, MLflow its own variable.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal",
                  "AWS_DEFAULT_REGION": "us-east-1",
                  # Never ask an instance-metadata endpoint (169.254.169.254) for credentials.
                  "AWS_EC2_METADATA_DISABLED": "true"}


class ServiceError(RuntimeError):
    """A local server did not start: the reason and the tail of its log, in the message."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def venv_executable(name: str) -> str:
    """`name` next to this Python (the virtual environment's console scripts), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found next to {sys.executable} or on PATH")
    return found


@dataclass
class Service:
    """A started server: where it answers, and how to stop it."""

    name: str
    url: str
    log: Path
    stop_fn: Callable[[], None]
    env: dict[str, str] = field(default_factory=dict)   # what a client process needs to reach it

    def stop(self) -> None:
        self.stop_fn()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the group `proc` leads (started with start_new_session), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env={**os.environ, **(env or {})})


def wait_http(url: str, proc: subprocess.Popen | None, log: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{name} exited with code {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} did not answer at {url} within {timeout:.0f} s: {_tail(log)}")
        time.sleep(0.3)


# --- S3: moto's server --------------------------------------------------------------------

def start_s3(root: Path, bucket: str = "ayt", timeout: float = 60.0) -> Service:
    """moto's S3-compatible server on 127.0.0.1 with `bucket` created; `env` names the endpoint
    and the credentials for every process that writes s3://<bucket>/..."""
    port = free_port()
    log = Path(root) / "s3.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)], log)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http(url + "/moto-api/", proc, log, "moto server", timeout)
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url, "MLFLOW_S3_ENDPOINT_URL": url}
        _create_bucket(url, bucket, env)
    except BaseException:
        stop_process_group(proc)
        raise
    return Service("s3", f"s3://{bucket}", log, lambda: stop_process_group(proc), env)


def _create_bucket(url: str, bucket: str, env: dict[str, str]) -> None:
    from pyarrow import fs as pafs
    s3 = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           region=env["AWS_DEFAULT_REGION"], endpoint_override=url, allow_bucket_creation=True)
    s3.create_dir(bucket)


# --- PostgreSQL ---------------------------------------------------------------------------

POSTGRES_USER = "ayt"


def postgres_bin_dir() -> Path | None:
    """Where initdb and pg_ctl live: PATH, else Debian's /usr/lib/postgresql/<version>/bin, else
    the server binaries the `pgserver` wheel bundles (in the test and rehearsal extras), so a
    machine with only Python still gets a real PostgreSQL."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    return bundled_postgres_bin_dir()


def bundled_postgres_bin_dir() -> Path | None:
    """The PostgreSQL binaries of the `pgserver` wheel, if it is installed (found without importing
    it: its import sets up a server-wide lock file this project does not use)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file() else None


def _postgres_system_user(bin_dir: Path) -> pwd.struct_passwd:
    """The user a root process runs PostgreSQL as: Debian's `postgres` where it exists, else the
    user pgserver itself creates. With pgserver's binaries, its own helpers make them reachable
    for that user (as pgserver does when it runs as root: a venv may sit under /root)."""
    bundled = bin_dir == bundled_postgres_bin_dir()
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        entry = None
    if entry is not None and not bundled:
        return entry
    try:
        with warnings.catch_warnings():         # its import sets up a runtime dir it warns about
            warnings.simplefilter("ignore")
            from pgserver import utils as pg_utils
    except ImportError:
        raise ServiceError("running as root and there is no `postgres` user to run PostgreSQL as "
                           "(the test extra's pgserver creates one: pip install -e '.[test]')") from None
    entry = entry or pg_utils.ensure_user_exists("pgserver")
    pg_utils.ensure_prefix_permissions(bin_dir)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    pg_utils.ensure_folder_permissions(bin_dir, read | execute)
    pg_utils.ensure_folder_permissions(bin_dir.parent / "lib", read)
    pg_utils.ensure_folder_permissions(bin_dir.parent / "share", read)
    return entry


def start_postgres(root: Path, database: str = "mlflow", timeout: float = 60.0) -> Service:
    """A PostgreSQL server of its own on 127.0.0.1 (initdb into a fresh directory, pg_ctl start
    on a free port, trust authentication for local connections only) with `database` created.

    PostgreSQL refuses to run as root: run as root, the cluster belongs to the `postgres` user
    that Debian's package creates (or pgserver's own user), in a directory under /tmp that user
    can reach (a pytest tmp_path's parents are root-only)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise ServiceError("PostgreSQL not found: no initdb on PATH, under /usr/lib/postgresql/*/bin or in the "
                           "pgserver wheel (pip install -e '.[test]' brings it)")
    as_user: list[str] = []
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        owner = _postgres_system_user(bin_dir)
        as_user = [shutil.which("runuser") or "runuser", "-u", owner.pw_name, "--"]
        base = Path(tempfile.mkdtemp(prefix="ayt-pg-"))
        os.chown(base, owner.pw_uid, owner.pw_gid)
    else:
        base = Path(tempfile.mkdtemp(prefix="pg-", dir=root))
    data, log = base / "data", base / "postgres.log"
    port = free_port()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=base)

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        with contextlib.suppress(OSError):
            (root / "postgres.log").write_text(_tail(log, 20000))
        shutil.rmtree(base, ignore_errors=True)

    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8",
                   "--no-sync")
        if done.returncode != 0:
            raise ServiceError(f"initdb failed: {(done.stderr or done.stdout)[-2000:]}")
        options = f"-c listen_addresses={LOOPBACK} -p {port} -c unix_socket_directories={data} -c fsync=off"
        done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t",
                   str(int(timeout)), "start")
        if done.returncode != 0:
            raise ServiceError(f"pg_ctl start failed: {(done.stderr or done.stdout)[-1000:]} {_tail(log)}")
        _create_database(f"postgresql://{POSTGRES_USER}@{LOOPBACK}:{port}", database)
    except BaseException:
        stop()
        raise
    # SQLAlchemy URI with the driver named: SQLAlchemy 2.0 would pick psycopg2 for plain
    # postgresql://, 2.1 picks psycopg (3); this is psycopg 3 under either.
    return Service("postgresql", f"postgresql+psycopg://{POSTGRES_USER}@{LOOPBACK}:{port}/{database}", log, stop)


def _create_database(server: str, database: str) -> None:
    import psycopg
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')


# --- MLflow -------------------------------------------------------------------------------

def start_mlflow(root: Path, backend_uri: str, artifacts_destination: str, workers: int = 2,
                 env: dict[str, str] | None = None, timeout: float = 180.0) -> Service:
    """`mlflow server` on 127.0.0.1 as the cluster recipe runs it: `workers` server processes
    writing one tracking store, artifacts proxied to `artifacts_destination`."""
    port = free_port()
    log = Path(root) / "mlflow-server.log"
    proc = _spawn([venv_executable("mlflow"), "server", "--backend-store-uri", backend_uri,
                   "--artifacts-destination", artifacts_destination, "--host", LOOPBACK, "--port", str(port),
                   "--workers", str(workers)], log, cwd=Path(root),
                  # No background job runners (huey): a plain tracking server starts faster.
                  env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http(url + "/health", proc, log, "mlflow server", timeout)
    except BaseException:
        stop_process_group(proc)
        raise
    return Service("mlflow", url, log, lambda: stop_process_group(proc))
