"""The rehearsal's PostgreSQL on a machine with only Python: with no initdb on PATH and no
Debian package, the server binaries come from the `pgserver` wheel of the test extra, and a real
server starts on 127.0.0.1 and answers SQL."""

from __future__ import annotations

import shutil

import pytest

from ayt.cluster import services


def test_without_a_system_postgresql_the_bundled_server_starts_and_answers(tmp_path, monkeypatch):
    bundled = services.bundled_postgres_bin_dir()
    assert bundled is not None, "the test extra installs pgserver, whose wheel bundles initdb and pg_ctl"
    real_which = shutil.which
    monkeypatch.setattr(services.shutil, "which",
                        lambda name, *a, **k: None if name in ("initdb", "pg_ctl") else real_which(name, *a, **k))
    monkeypatch.setattr(services.glob, "glob", lambda pattern: [])
    assert services.postgres_bin_dir() == bundled
    psycopg = pytest.importorskip("psycopg")
    with services.start_postgres(tmp_path, database="probe") as server:
        url = server.url.replace("postgresql+psycopg://", "postgresql://")
        assert url.startswith("postgresql://") and "@127.0.0.1:" in url
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            assert conn.execute("SELECT current_database()").fetchone()[0] == "probe"
    assert version.split(".")[0].isdigit()


def test_nothing_found_is_one_line_that_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(services.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(services.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(services, "bundled_postgres_bin_dir", lambda: None)
    with pytest.raises(services.ServiceError, match=r"pgserver"):
        services.start_postgres(tmp_path)


def test_status_lists_the_worker_nodes_reclaim_takes(tmp_path):
    """`python -m ayt.cluster status` names the provider's live worker nodes, the argument of
    `reclaim`: launched ones, less those terminated or reclaimed (read from the provider's events)."""
    from ayt.cluster.provider import record_event
    from ayt.cluster.rehearsal import RehearsalCluster
    cluster = RehearsalCluster(temp_dir=tmp_path, gcs_port=1, dashboard_port=2, config={})
    cluster.state_dir.mkdir(parents=True, exist_ok=True)
    for event, node in [("launching", "a1"), ("launched", "a1"), ("launched", "b2"), ("launched", "c3"),
                        ("terminated", "a1"), ("reclaimed", "c3")]:
        record_event(cluster.state_dir, event, node)
    assert cluster.worker_nodes() == ["b2"]
