"""The `init_file` artifact (training.init=file): a denoiser state dict from a file, checked
against the run's network and cached by its content (`ayt.artifacts.init_file_spec`)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ayt.data import ImageData
from ayt.errors import ConfigError
from ayt.networks.precond import build_denoiser

HINT = "(EDM pickles: python -m ayt.tools.import_edm; network.* must match the file)"


def build_init_file(cfg: DictConfig, out: Path, data: ImageData, device: torch.device, progress: bool = True) -> None:
    """Check the state dict fits `cfg.network` (one-line ConfigError naming training.init_file,
    the key and the shapes), then write the tensors the network has, as denoiser.pt."""
    path = str(cfg.training.init_file)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError("training.init_file", f"cannot read {path} as a torch state dict "
                          f"({' '.join(str(err).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("training.init_file", f"{path} is not a state dict of tensors")
    with torch.device("meta"):
        expected = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).state_dict()
    for key, want in expected.items():
        if key not in state:
            raise ConfigError("training.init_file", f"{path} has no {key!r} (shape {list(want.shape)}) {HINT}")
        if tuple(state[key].shape) != tuple(want.shape):
            raise ConfigError("training.init_file", f"{path}: {key!r} has shape {list(state[key].shape)}, "
                              f"the network expects {list(want.shape)} {HINT}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError("training.init_file", f"{path}: unexpected key {extra[0]!r} {HINT}")
    torch.save({k: state[k] for k in expected}, out / "denoiser.pt")
