"""A content-addressed cache of the artifacts trials share (pretrained denoiser, feature
maps, FID extractor): built once, keyed by a hash of the config that made them and of the
code that builds them, written atomically, and safe when many processes ask for the same
one at once. Each kind of artifact is declared once, in `ARTIFACT_KINDS` below.

The code version: a kind's key includes a hash of the source bytes (`source_version`) of
its builder's module and of every `ayt` module that module imports, transitively (read
with `ast`, `ayt.import_graph`), plus those of the kinds it is built from: its
`ARTIFACT_SOURCES` entry, derived, never kept by hand. A change to, say, the augmentation
code then builds a new feature map instead of silently reusing one trained with the old
labels. The price is that any edit to those files (a comment too) rebuilds; the old
directories stay on disk until removed. A builder should import only what it computes with.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from ayt.import_graph import closure


def config_hash(spec: Any, length: int = 12) -> str:
    """Stable short hash of a (nested) config."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime): init files are ~220 MB."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# Kind of artifact -> the modules whose source keys its cache: filled from ARTIFACT_KINDS on
# first use (`artifact_sources`), once per process; a test may set an entry.
ARTIFACT_SOURCES: dict[str, tuple[str, ...]] = {}


def artifact_sources(kind: str) -> tuple[str, ...]:
    """The modules whose code builds artifacts of `kind`: its builder's module and every `ayt`
    module that one imports, transitively, plus the sources of the kinds it is built from."""
    if kind not in ARTIFACT_SOURCES:
        if kind not in ARTIFACT_KINDS:
            raise KeyError(f"artifact kind {kind!r} has no entry in ayt.artifacts.ARTIFACT_SOURCES "
                           f"(known: {', '.join(ARTIFACT_KINDS)}); declare it in ARTIFACT_KINDS")
        declared = ARTIFACT_KINDS[kind]
        modules = set(closure([declared.module]))
        for used in declared.uses:
            modules.update(artifact_sources(used))
        ARTIFACT_SOURCES[kind] = tuple(sorted(modules))
    return ARTIFACT_SOURCES[kind]


def code_version(kind: str) -> str:
    """The version of the code that builds artifacts of `kind` (see `artifact_sources`)."""
    return source_version(artifact_sources(kind))


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
                (tmp / "code.json").write_text(json.dumps({"version": version, "modules": artifact_sources(kind)},
                                                          indent=2))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final


# ---- the kinds --------------------------------------------------------------------------

@dataclass
class Artifacts:
    """Absolute paths of the shared artifacts one run uses, plus how good they are."""

    pretrained: str | None = None      # start weights (torch.save state dict) of the run's start mode, if any
    feature_map: str | None = None     # feature map {kwargs, state_dict, metrics}
    fid_weights: str | None = None     # FID extractor weights (classifier or Inception)
    fid_cache: str = ""                # torch-fidelity cache root (reference statistics)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def path(self, kind: str) -> str | None:
        """The file of the artifact of `kind` this run uses (None: not built for it)."""
        return getattr(self, ARTIFACT_KINDS[kind].slot)


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of cached artifact, declared once: what defines it, what builds it, where a
    run finds it. A run needs it when its start mode (`ayt.startup`) or its loss's frozen
    networks (`ayt.method.losses.FROZEN`) name it, or when `needed` says so."""

    name: str                                   # its directory under the cache root; record keys <name>_*
    build: str                                  # "module:function"; fn(cfg, tmp_dir, data, device, progress) writes it
    spec: Callable[[DictConfig], dict]          # the config that defines it (with the code version: its key)
    file: str                                   # the file in its directory a run reads
    slot: str                                   # the `Artifacts` field that file's path fills
    uses: tuple[str, ...] = ()                  # kinds it is built from: their code keys it too
    needed: Callable[[DictConfig], bool] | None = None          # needed by runs it says (else: when named)
    record: Callable[[dict], dict[str, Any]] | None = None      # extra run-record entries from its spec

    @property
    def module(self) -> str:
        return self.build.partition(":")[0]

    def builder(self) -> Callable[..., None]:
        """The build function, imported on first use (builders import torch and the code they run)."""
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)


ARTIFACT_KINDS: dict[str, ArtifactKind] = {}


def register_artifact(kind: ArtifactKind) -> ArtifactKind:
    ARTIFACT_KINDS[kind.name] = kind
    return kind


DATASET_AUGMENT_KEYS = ("augment_rot_max",)   # dataset keys read only through `augment` (its spec has them)


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def _data_spec(cfg: DictConfig) -> dict:
    return {k: v for k, v in _container(cfg.dataset).items() if k not in DATASET_AUGMENT_KEYS}


def pretrained_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "network": _container(cfg.network), "edm": _container(cfg.edm),
            "pretrain": _container(cfg.pretrain)}


def init_file_spec(cfg: DictConfig) -> dict:
    """training.init=file: keyed by the file's content (sha256), not its path, and by the network
    it must fit (a run whose network changes checks the file again)."""
    return {"init_file_sha256": file_sha256(cfg.training.init_file), "resolution": int(cfg.dataset.resolution),
            "network": _container(cfg.network), "edm": _container(cfg.edm)}


def converged_spec(cfg: DictConfig) -> dict:
    """What defines the converged model: the pretrained denoiser's spec, and how it was trained."""
    return {"pretrained": pretrained_spec(cfg), "schedule": _container(cfg.schedule),
            "converged": _container(cfg.converged), "optimizer": {"adam_betas": list(cfg.adam_betas)},
            "precision": str(cfg.precision)}


def feature_map_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "augment": _container(cfg.augment), "feature_map": _container(cfg.feature_map)}


def classifier_spec(cfg: DictConfig) -> dict:
    return {"dataset": _data_spec(cfg), "classifier": _container(cfg.fid.classifier)}


def _uses_classifier(cfg: DictConfig) -> bool:
    """Datasets without a standard extractor measure FID with a classifier of their own."""
    return cfg.dataset.fid_extractor != "inception"


register_artifact(ArtifactKind("pretrained", "ayt.training.pretrain:build_pretrained", pretrained_spec,
                               file="denoiser.pt", slot="pretrained"))
register_artifact(ArtifactKind("init_file", "ayt.training.init_file:build_init_file", init_file_spec,
                               file="denoiser.pt", slot="pretrained",
                               record=lambda spec: {"init_file_sha256": spec["init_file_sha256"]}))
register_artifact(ArtifactKind("converged", "ayt.training.converged:build_converged", converged_spec,
                               file="denoiser.pt", slot="pretrained", uses=("pretrained",)))
register_artifact(ArtifactKind("feature_map", "ayt.training.feature_map:build_feature_map", feature_map_spec,
                               file="feature_map.pt", slot="feature_map"))
register_artifact(ArtifactKind("fid_classifier", "ayt.eval.classifier:build_classifier", classifier_spec,
                               file="classifier.pt", slot="fid_weights", needed=_uses_classifier))
