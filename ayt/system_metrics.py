"""MLflow's own system metrics for the runs and trials that ask for them (`tracking.system_metrics`):
CPU, memory, disk and network through psutil, GPU utilisation, memory and power through pynvml
(the `gpu` extra), logged as `system/...` by the process that trains, on the node it trains on.
mlflow is imported only when they are on: Ray Train workers otherwise never load it."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def system_metrics(tracking: Any, run_id: str | None, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Sample this machine every `tracking.system_metrics_interval_s` seconds into MLflow run
    `run_id` while the block runs (nothing if `tracking.system_metrics` is off or there is no
    run). With several workers each rank's keys say which rank logged them (system/rank1/...)."""
    if not tracking.get("system_metrics") or not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, sampling_interval=float(tracking.system_metrics_interval_s),
                                   resume_logging=True, node_id=f"rank{rank}" if world_size > 1 else None,
                                   tracking_uri=str(tracking.uri))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
