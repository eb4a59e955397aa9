"""The node provider of the local rehearsal: Ray's fake multi-node provider (each "instance" is
a Ray node started as processes on this machine by the autoscaler itself), plus two things a
cloud has and it lacks: an instance taken away without asking (a spot reclaim), and a record of
what happened, when.

It runs inside Ray's autoscaler (the head's `monitor.py`, autoscaler v1: the one `ray up`
runs), loaded through `provider: {type: external, module: ayt.cluster.provider.RehearsalNodeProvider}`.
Nothing outside that process can call it, so requests come as files:

- `<state_dir>/reclaim/<node_id>`: at its next look at its instances (every autoscaler update,
  1 s in a rehearsal) the provider SIGKILLs every process of that node, as a reclaimed spot
  instance vanishes, and stops listing it. The autoscaler sees an instance gone; Ray sees a
  node die; whatever ran there fails and is retried elsewhere.
- `<state_dir>/events.jsonl`: one JSON line per launch (`launching` when the autoscaler asks,
  `launched` once the node's processes run), termination (the autoscaler's, e.g. an idle
  node) and reclaim, with the wall-clock time.

Checked against ray 2.60.0's `ray.autoscaler._private.fake_multi_node.node_provider`
(private: it starts nodes with `ray._private.node.Node`). A Ray version that changes it fails
here, at the first launch, not silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
RECLAIM_DIR = "reclaim"


def record_event(state_dir: str | os.PathLike, event: str, node_id: str, **extra: Any) -> None:
    """Append one event line (a single small write: concurrent appends stay whole lines)."""
    line = json.dumps({"time": time.time(), "event": event, "node_id": node_id, **extra}) + "\n"
    with open(Path(state_dir) / EVENTS_FILE, "a") as f:
        f.write(line)


def read_events(state_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(state_dir) / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RehearsalNodeProvider(FakeMultiNodeProvider):
    """Fake multi-node instances that can be reclaimed, and a log of their lives."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.state_dir = Path(provider_config["state_dir"])
        self._launching = ""
        (self.state_dir / RECLAIM_DIR).mkdir(parents=True, exist_ok=True)

    def non_terminated_nodes(self, tag_filters):
        self._reclaim_requested()
        return super().non_terminated_nodes(tag_filters)

    def _next_hex_node_id(self):
        """Called as a launch begins (before its Ray processes start): the request's time."""
        node_id = self._launching = super()._next_hex_node_id()
        record_event(self.state_dir, "launching", node_id)
        return node_id

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:                    # one launch at a time (the autoscaler has two launcher threads)
            before, children = set(self._nodes), _children()
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            except Exception as err:
                # Ray gives a node 30 s to register (ray._private.node); one that did not is
                # dropped by the autoscaler, which launches another. Its processes would still
                # join later, as a node no provider knows and no autoscaler ever removes: kill them.
                for pid in _children() - children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                record_event(self.state_dir, "launch_failed", self._launching,
                             reason=" ".join(str(err).split())[:300])
                raise
            for node_id in set(self._nodes) - before:
                record_event(self.state_dir, "launched", node_id, node_type=tags.get(TAG_RAY_USER_NODE_TYPE))

    def terminate_node(self, node_id):
        """The autoscaler's termination (idle, or over a limit): Ray's graceful stop."""
        node_type = self._nodes.get(node_id, {}).get("tags", {}).get(TAG_RAY_USER_NODE_TYPE)
        super().terminate_node(node_id)
        record_event(self.state_dir, "terminated", node_id, node_type=node_type)

    def _reclaim_requested(self) -> None:
        for request in sorted((self.state_dir / RECLAIM_DIR).iterdir()):
            node_id = request.name
            with self.lock:
                node = self._nodes.get(node_id)
                if node is not None and "node" in node:       # the head has no "node": never reclaimed
                    self._nodes.pop(node_id)
                    # No drain, no graceful stop: the instance is gone.
                    node["node"].kill_all_processes(check_alive=False, allow_graceful=False)
                    record_event(self.state_dir, "reclaimed", node_id,
                                 node_type=node["tags"].get(TAG_RAY_USER_NODE_TYPE))
                else:
                    record_event(self.state_dir, "reclaim_ignored", node_id)
            request.unlink(missing_ok=True)


def _children() -> set[int]:
    """This process's children (a node's raylet and the rest are started as such)."""
    me, found = str(os.getpid()), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[-1].split()[1] == me:
                found.add(int(entry.name))
    return found
