"""A content-addressed cache of the artifacts trials share (pretrained denoiser, feature
maps, FID extractor): built once, keyed by a hash of the config that made them, written
atomically, and safe when many processes ask for the same one at once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


def config_hash(spec: Any, length: int = 12) -> str:
    """Stable short hash of a (nested) config."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (flock) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ArtifactCache:
    """``root/<kind>/<hash>/`` directories, each holding what ``build`` wrote plus spec.json."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, spec: Any) -> Path:
        return self.root / kind / config_hash(spec)

    def get_or_build(self, kind: str, spec: Any, build: Callable[[Path], None]) -> Path:
        """Return the artifact's directory, building it first if no process has yet.

        ``build(tmp_dir)`` writes into a private temporary directory that is renamed into
        place only when complete, so a reader never sees a half-written artifact.
        """
        final = self.path(kind, spec)
        if final.is_dir():
            return final
        with file_lock(final.with_suffix(".lock")):
            if final.is_dir():          # another process built it while we waited
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                build(tmp)
                if isinstance(spec, DictConfig):
                    spec = OmegaConf.to_container(spec, resolve=True)
                (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final
