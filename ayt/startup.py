"""How a run's network starts (`training.init`): one registered mode each, naming the
artifact kind that holds its starting weights (`ayt.artifacts.ARTIFACT_KINDS`) and the
config checks it needs before any work. The config checks, the artifact layer and the
training loop ask the mode; none of them compares `training.init` with a name.

A new mode is one `register_start_mode(StartMode(...))` here, plus its artifact kind if it
starts from cached weights. This module imports nothing heavy: `ayt.config` imports it at
CLI start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from ayt.errors import ConfigError


def _no_checks(cfg: DictConfig) -> None:
    """A mode that reads no config of its own."""


@dataclass(frozen=True)
class StartMode:
    """One value of `training.init`."""

    name: str
    artifact: str | None                                  # artifact kind holding its start weights (None: random init)
    validate: Callable[[DictConfig], None] = _no_checks   # its own config checks (ConfigError naming the field)
    reads_init_file: bool = False                         # starts from training.init_file (named by its content)

    def initialise(self, net: Any, path: str | None) -> None:
        """Load the start weights (a denoiser state dict at `path`, the artifact's file) into
        `net`; without an artifact (or a path: a test's bare `Artifacts()`) it keeps its weights."""
        if self.artifact is None or not path:
            return
        import torch  # lazy: this module is on the CLI start-up path (ayt.config), torch is not
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


START_MODES: dict[str, StartMode] = {}


def register_start_mode(mode: StartMode) -> StartMode:
    START_MODES[mode.name] = mode
    return mode


def start_mode(cfg: DictConfig) -> StartMode:
    """The mode `cfg.training.init` names (validated by `ayt.config`)."""
    return START_MODES[str(cfg.training.init)]


def validate_init_file(cfg: DictConfig) -> None:
    """training.init=file needs training.init_file, an existing file (read and shape-checked
    when its artifact is built)."""
    path = cfg.training.get("init_file")
    if not path:
        raise ConfigError("training.init_file", "required with training.init=file (a denoiser state dict, "
                          "e.g. from python -m ayt.tools.import_edm)")
    if not Path(str(path)).is_file():
        raise ConfigError("training.init_file", f"no such file: {path}")


CONVERGED_KEYS = ("loss", "iterations", "batch_size", "lr", "seed", "eval_every", "ema_decay")


def validate_converged(cfg: DictConfig) -> None:
    """`converged.*` (read only with training.init=converged): every key present and sound, and
    a loss that needs no artifact of its own (the start favours neither loss under study)."""
    block = cfg.get("converged")
    if block is None:
        raise ConfigError("converged", "required with training.init=converged (see conf/config.yaml)")
    for key in CONVERGED_KEYS:
        if key not in block:
            raise ConfigError(f"converged.{key}", "missing (see conf/config.yaml)")
    for key in ("iterations", "batch_size", "eval_every"):
        value = block[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"converged.{key}", f"must be an integer >= 1, got {value!r}")
    if block.eval_every > block.iterations:
        raise ConfigError("converged.eval_every", f"must be <= converged.iterations ({block.iterations}), "
                          f"got {block.eval_every}")
    if not isinstance(block.lr, (int, float)) or isinstance(block.lr, bool) or not block.lr > 0:
        raise ConfigError("converged.lr", f"must be a number > 0, got {block.lr!r}")
    if not isinstance(block.ema_decay, (int, float)) or not 0 <= block.ema_decay < 1:
        raise ConfigError("converged.ema_decay", f"must be a number in [0, 1), got {block.ema_decay!r}")
    from ayt.method.losses import LOSSES  # lazy: torch (CLI start-up path, as above)
    allowed = sorted(name for name, loss in LOSSES.items() if not loss.artifacts())
    if str(block.loss) not in allowed:
        raise ConfigError("converged.loss", f"unknown or feature-map loss {block.loss!r}; allowed: "
                          + ", ".join(allowed))


register_start_mode(StartMode("pretrained", artifact="pretrained"))     # our EDM pretraining (cached)
register_start_mode(StartMode("scratch", artifact=None))                # random weights
register_start_mode(StartMode("file", artifact="init_file", validate=validate_init_file, reads_init_file=True))
register_start_mode(StartMode("converged", artifact="converged", validate=validate_converged))
