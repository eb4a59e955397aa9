"""Diagnostics: measurements taken during training, each switched on by its block
`diagnostics.<name>` in conf/config.yaml and logged at evaluations under `eval/…`.

The loop, the step, the checkpoint code and the config checks name no diagnostic: they go
through this registry. A new diagnostic is one `Diagnostic` subclass registered with
`@register_diagnostic("<name>")` (here, or in a module of `MODULES`) plus its default block
under `diagnostics:` in conf/config.yaml (`enabled:` and its own fields). For example:

    @register_diagnostic("weight_norm")
    class WeightNorm(Diagnostic):
        '''|θ|₂ of the online network at each evaluation (rank 0).'''
        chief_only = True

        @classmethod
        def create(cls, cfg, spec, data, device):
            return cls()

        def evaluate(self, step, iteration, reduce):
            from ayt.networks.precond import unwrap
            return {EVAL + "weight_norm": float(torch.cat([p.flatten() for p in unwrap(step.net).parameters()]).norm())}

    # conf/config.yaml
    diagnostics:
      weight_norm:
        enabled: false        # eval/weight_norm

What a diagnostic may define (each a no-op by default), in the order a run calls it:

  validate(cfg, key)        before any work, whether enabled or not: raise ConfigError naming
                            `<key>.<field>` (key = `diagnostics.<name>`; `enabled` is checked here)
  create(cfg, spec, data, device)   once per run on each rank it runs on (`chief_only`: rank 0)
  tags()                    rank 0, once: MLflow run tags
  load_state_dict(state)    on resume, from this rank's checkpoint
  begin_step / after_backward / end_step   inside every optimizer step, for a diagnostic that
                            reads the micro-batch gradients (`observes_gradients`, `micro_batches`)
  evaluate(step, iteration, reduce)   every evaluation, on every rank it was built on (so it may
                            all-reduce with `reduce`): `{eval/...: float}`
  state_dict()              every checkpoint, on every rank it was built on
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ayt.errors import ConfigError

DIAGNOSTICS: dict[str, type["Diagnostic"]] = {}
MODULES = ("ayt.training.noise_scale", "ayt.eval.tangent")     # they register their diagnostics on import
STATE_FILE = "diagnostics_rank{rank}.pt"                        # {name: state_dict()} of one rank's diagnostics


def register_diagnostic(name: str):
    """Register a `Diagnostic` subclass as the one `diagnostics.<name>` configures."""
    def wrap(cls):
        cls.name = name
        DIAGNOSTICS[name] = cls
        return cls
    return wrap


def registry() -> dict[str, type["Diagnostic"]]:
    """Every registered diagnostic by name (importing the modules that define them)."""
    for module in MODULES:
        importlib.import_module(module)
    return DIAGNOSTICS


class Diagnostic:
    """One measurement during training; see the module docstring for the hooks."""

    name: ClassVar[str]
    chief_only: ClassVar[bool] = False          # built on rank 0 only (else on every rank)
    observes_gradients: ClassVar[bool] = False  # the step calls begin_step/after_backward/end_step
    micro_batches: int = 1                      # micro-batches per step it needs (when the step has no accumulation)

    @classmethod
    def validate(cls, cfg: DictConfig, key: str) -> None:
        """Raise ConfigError naming `<key>.<field>` for an invalid field of the block at `key`."""

    @classmethod
    def create(cls, cfg: DictConfig, spec: DictConfig, data, device: torch.device) -> "Diagnostic":
        """The diagnostic of this run, from its block `spec` (enabled) and the whole `cfg`."""
        return cls()

    def tags(self) -> dict[str, Any]:
        return {}

    def begin_step(self, params: list[Tensor], chunks: int) -> None:
        """Before the first micro-batch of a step split into `chunks`."""

    def after_backward(self, keep: bool) -> None:
        """After a micro-batch's backward whose gradient is still this worker's own (not yet
        all-reduced); `keep`: another such micro-batch follows."""

    def end_step(self, b_small: int, b_big: int) -> None:
        """After the last backward, before the optimizer step; `.grad` is the step's gradient
        (b_small: images per micro-batch on this worker, b_big: the global batch)."""

    def evaluate(self, step, iteration: int, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Metrics at an evaluation; `reduce` averages a tensor over workers (a collective)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def validate_diagnostics(cfg: DictConfig) -> None:
    """Every block under `diagnostics`: a known name, `enabled` true or false, its own fields."""
    known = registry()
    for name in OmegaConf.select(cfg, "diagnostics") or {}:
        key = f"diagnostics.{name}"
        if name not in known:
            raise ConfigError(key, "unknown diagnostic; allowed: " + ", ".join(sorted(known)))
        spec = OmegaConf.select(cfg, key)
        if not isinstance(spec, DictConfig):
            raise ConfigError(key, f"must be a block with `enabled: true|false`, got {spec!r}")
        if not isinstance(spec.get("enabled"), bool):
            raise ConfigError(f"{key}.enabled", f"must be true or false, got {spec.get('enabled')!r}")
        known[name].validate(cfg, key)


class Diagnostics:
    """The diagnostics one rank runs, in config order, with the calls the loop makes on all of them."""

    def __init__(self, active: Iterable[Diagnostic] = ()):
        self.active = {type(d).name: d for d in active}

    def __len__(self) -> int:
        return len(self.active)

    def gradient_hooks(self) -> tuple[Diagnostic, ...]:
        """What the step calls around its backward passes (`ConsistencyStep.hooks`)."""
        return tuple(d for d in self.active.values() if d.observes_gradients)

    def tags(self) -> dict[str, Any]:
        return {k: v for d in self.active.values() for k, v in d.tags().items()}

    def evaluate(self, step, iteration: int, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return {k: v for d in self.active.values() for k, v in d.evaluate(step, iteration, reduce).items()}

    def save(self, directory: Path, rank: int) -> None:
        """This rank's states, `{name: state}`, next to the rest of a checkpoint."""
        if self.active:
            torch.save({name: d.state_dict() for name, d in self.active.items()},
                       Path(directory) / STATE_FILE.format(rank=rank))

    def load(self, directory: Path, rank: int, device: torch.device, blob: Mapping[str, Any]) -> None:
        """Restore what `save` wrote; a diagnostic without a saved state (a rank new to the run, a
        diagnostic switched on at the restart) starts afresh. Checkpoints from before this file
        kept rank 0's states in its state file (`blob`) and each rank's own in `<name>_rank<r>.pt`."""
        path = Path(directory) / STATE_FILE.format(rank=rank)
        if path.is_file():
            states = torch.load(path, map_location=device, weights_only=True)
        else:
            states = {name: blob[name] for name in self.active if name in blob}
            for name in self.active:
                old = Path(directory) / f"{name}_rank{rank}.pt"
                if old.is_file():
                    states[name] = torch.load(old, map_location=device, weights_only=True)
        for name, d in self.active.items():
            if name in states:
                d.load_state_dict(states[name])


def build_diagnostics(cfg: DictConfig, rank: int, data, device: torch.device,
                      gradients_only: bool = False) -> Diagnostics:
    """The enabled diagnostics of `cfg` that run on `rank` (`gradients_only`: only those the step
    calls, for a step built on its own, as the benchmarks do)."""
    known, active = registry(), []
    for name, spec in (OmegaConf.select(cfg, "diagnostics") or {}).items():
        cls = known[name]
        if not spec.enabled or (cls.chief_only and rank != 0) or (gradients_only and not cls.observes_gradients):
            continue
        active.append(cls.create(cfg, spec, data, device))
    return Diagnostics(active)
