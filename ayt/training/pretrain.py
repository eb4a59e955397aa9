"""Stage 0: EDM diffusion pretraining (ALGORITHM §2). Consistency training starts here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from ayt.data import ImageData
from ayt.method.ema import EMA
from ayt.networks.precond import build_denoiser


def edm_loss(denoiser: nn.Module, x: Tensor, p_mean: float, p_std: float, sigma_data: float) -> Tensor:
    """Per-sample lambda(sigma) * |D(x + sigma*eps, sigma) - x|^2 with log-normal sigma."""
    sigma = (p_mean + p_std * torch.randn(x.shape[0], device=x.device)).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
    return weight * (denoiser(noisy, sigma) - x).flatten(1).square().sum(1)


def pretrain_diffusion(denoiser: nn.Module, images: Tensor, cfg_pretrain, sigma_data: float,
                       progress: bool = True) -> tuple[dict, dict]:
    """Train `denoiser` with the EDM loss on `images`; return (EMA state dict, metrics)."""
    device = images.device
    generator = torch.Generator(device="cpu").manual_seed(int(cfg_pretrain.seed))
    torch.manual_seed(int(cfg_pretrain.seed))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=float(cfg_pretrain.lr))
    ema = EMA(denoiser, decay=float(cfg_pretrain.ema_decay))
    batch = int(cfg_pretrain.batch_size)
    running = None
    denoiser.train()
    for _ in tqdm(range(int(cfg_pretrain.iterations)), desc="pretrain (EDM)", disable=not progress,
                  mininterval=2.0):
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator).to(device)
        loss = edm_loss(denoiser, images[idx], float(cfg_pretrain.p_mean), float(cfg_pretrain.p_std),
                        sigma_data).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(denoiser, batch)
        running = loss.detach() if running is None else 0.98 * running + 0.02 * loss.detach()
    final = float(running) if running is not None else float("nan")
    if final != final or final in (float("inf"), float("-inf")):
        raise RuntimeError(f"EDM pretraining diverged (loss {final}); lower pretrain.lr")
    return ema.state_dict(), {"pretrain_loss": final}


def build_pretrained(cfg: DictConfig, out: Path, data: ImageData, device: torch.device, progress: bool = True) -> None:
    """The `pretrained` artifact (ayt.artifacts): the EDM denoiser's EMA weights and its final loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.pretrain.seed))
        net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).to(device)
    state, metrics = pretrain_diffusion(net, data.images.to(device), cfg.pretrain, float(cfg.edm.sigma_data),
                                        progress=progress)
    torch.save({k: v.cpu() for k, v in state.items()}, out / "denoiser.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
