"""A content-addressed cache of the artifacts trials share (pretrained denoiser, feature
maps, FID extractor): built once, keyed by a hash of the config that made them and of the
code that builds them, written atomically, and safe when many processes ask for the same
one at once.

The code version: each kind of artifact names the modules that build it in
`ARTIFACT_SOURCES`, and its key includes a hash of those modules' source bytes
(`source_version`). A change to, say, the augmentation code then builds a new feature map
instead of silently reusing one trained with the old labels. The price is that any edit
to those files (a comment too) rebuilds; the old directories stay on disk until removed.
A new kind of artifact must be added to `ARTIFACT_SOURCES`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf


def config_hash(spec: Any, length: int = 12) -> str:
    """Stable short hash of a (nested) config."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# Kind of artifact -> the modules whose source builds it (what `ayt.training.prepare` and
# `ayt.training.converged` call), including what defines the data it is built from.
_DENOISER = ("ayt.data", "ayt.networks.unet", "ayt.networks.precond")
ARTIFACT_SOURCES: dict[str, tuple[str, ...]] = {
    "pretrained": _DENOISER + ("ayt.training.pretrain",),
    "init_file": _DENOISER,
    "feature_map": ("ayt.data", "ayt.method.augment", "ayt.networks.feature_map", "ayt.training.feature_map",
                    "ayt.training.alignment", "ayt.method.losses"),
    "fid_classifier": ("ayt.data", "ayt.eval.classifier"),
    "converged": _DENOISER + ("ayt.training.pretrain", "ayt.training.converged", "ayt.training.loop",
                              "ayt.training.step", "ayt.method.losses", "ayt.method.schedule", "ayt.method.ema"),
}


def source_version(modules: Iterable[str], length: int = 12) -> str:
    """Short hash of the source files of the importable `modules` (their bytes, by name).

    Found with `importlib.util.find_spec`, read from disk on every call: a file edited since
    it was imported counts as edited (its artifact would not be the one the old code built)."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise ModuleNotFoundError(f"artifact source {name!r} has no source file")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()[:length]


def code_version(kind: str) -> str:
    """The version of the code that builds artifacts of `kind` (see `ARTIFACT_SOURCES`)."""
    if kind not in ARTIFACT_SOURCES:
        raise KeyError(f"artifact kind {kind!r} has no entry in ayt.artifacts.ARTIFACT_SOURCES "
                       f"(known: {', '.join(sorted(ARTIFACT_SOURCES))}); add the modules that build it")
    return source_version(ARTIFACT_SOURCES[kind])


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
    """``root/<kind>/<hash>/`` directories, each holding what ``build`` wrote plus spec.json
    (the config) and code.json (the code version); the hash covers both."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, spec: Any, version: str | None = None) -> Path:
        """Where the artifact of `kind` built from `spec` by the current code (or `version`) lives."""
        return self.root / kind / config_hash({"spec": spec, "code": version or code_version(kind)})

    def get_or_build(self, kind: str, spec: Any, build: Callable[[Path], None]) -> Path:
        """Return the artifact's directory, building it first if no process has yet.

        ``build(tmp_dir)`` writes into a private temporary directory that is renamed into
        place only when complete, so a reader never sees a half-written artifact.
        """
        version = code_version(kind)
        final = self.path(kind, spec, version)
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
                (tmp / "code.json").write_text(json.dumps({"version": version, "modules": ARTIFACT_SOURCES[kind]},
                                                          indent=2))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final
