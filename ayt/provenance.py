"""Where a result came from: the code that produced it (reports, MLflow tags, benchmark records).

A *code version* is the commit of the checkout this package was imported from, plus
`+dirty.<hash>` when the files that train a model (the package and its configs) differ from
that commit, the hash telling two different uncommitted states apart. It is read once per
process, when first asked: a long-lived Tune trial actor keeps the code it imported even if
the checkout moves on underneath it, so the version it reports is the one it runs.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parent.parent
# What trains a model: a change elsewhere (README, studies/ reports, tests) leaves the code clean.
CODE_PATHS = ("ayt", "conf", "pyproject.toml", "constraints.txt")
CODE_VERSION = "code_version"       # the key a trial's results carry it under (ayt.training contexts)
CODE_VERSIONS_TAG = "ayt.code_versions"     # MLflow tag: every code version a run (or study) ran on, in order
# Where a study trial ran, as its results say (ayt.training.tune_trial) and its MLflow run keeps:
NODE_ID = "node_id"                 # the Ray node of the trial's process
NODE_IDS_TAG = "ayt.node_ids"       # every node it ran on, in order (a preempted trial: two or more)
RESUMED_FROM = "resumed_from_iteration"     # the first result after a restore: the checkpoint's iteration
RESUMED_FROM_TAG = "ayt.resumed_from_iteration"


def tag_list(tags: Mapping[str, str], key: str) -> list[str]:
    """An ordered list kept in one MLflow tag, comma-separated (`ayt.code_versions`, `ayt.node_ids`)."""
    return [v for v in tags.get(key, "").split(",") if v]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """The commit of the checkout this package runs from, or "unknown" (an installed wheel)."""
    return (_git("rev-parse", "HEAD") or "").strip() or "unknown"


def git_dirty() -> bool:
    """Whether the code (CODE_PATHS: tracked changes and untracked files) differs from HEAD."""
    status = _git("status", "--porcelain", "--", *CODE_PATHS)
    return bool(status and status.strip())


def _dirty_hash() -> str:
    """A short hash of the uncommitted code: the diff against HEAD and the untracked files' bytes."""
    digest = hashlib.sha256((_git("diff", "HEAD", "--", *CODE_PATHS) or "").encode())
    for name in sorted((_git("ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS) or "").split()):
        digest.update(name.encode())
        try:
            digest.update((ROOT / name).read_bytes())
        except OSError:
            pass
    return digest.hexdigest()[:8]


@functools.cache
def code_version() -> str:
    """`<commit>` or `<commit>+dirty.<hash>`, read once per process (see the module docstring)."""
    commit = git_commit()
    if commit == "unknown" or not git_dirty():
        return commit
    return f"{commit}+dirty.{_dirty_hash()}"


def split_version(version: str) -> tuple[str, bool]:
    """(commit, dirty) of a code version string."""
    commit, _, rest = version.partition("+")
    return commit, rest.startswith("dirty")


def short_version(version: str) -> str:
    """`03fe705` or `03fe705+dirty.ab12cd34`: the form a person reads in a report."""
    commit, _, rest = version.partition("+")
    return commit[:7] + (f"+{rest}" if rest else "")


def provenance_tags(version: str | None = None) -> dict[str, str]:
    """The MLflow tags that say which code made a run."""
    version = version or code_version()
    commit, dirty = split_version(version)
    return {"ayt.git_commit": commit, "ayt.git_dirty": str(dirty).lower(), "ayt.code_version": version}
