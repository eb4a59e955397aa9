"""What the step, switches, mfd, fid and roofline benchmarks build: presets (network, image
size, batch), the real training step through the loop's own `build_training`, random inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch
from torch import Tensor

from ayt.bench import Options
from ayt.config import compose_config
from ayt.method.augment import AugmentPipeline
from ayt.networks.feature_map import FeatureMap, fm_kwargs
from ayt.training.loop import WorkerContext, build_training
from ayt.training.prepare import Artifacts, needs_feature_map
from ayt.training.step import unwrap


@dataclass(frozen=True)
class Preset:
    """A network + image size + batch; `overrides` are Hydra overrides of conf/config.yaml."""

    name: str
    resolution: int
    channels: int
    batch: int
    overrides: tuple[str, ...]
    description: str


CPU_PRESET = Preset(
    "cpu", 16, 1, 128, ("network=cpu", "dataset=digits"),
    "conf/network/cpu.yaml (model_channels 32, channel_mult [1,2,2], num_blocks 2, attention at 8, dropout 0.2) "
    "on digits-sized 16x16x1 random images, batch_size 128 (the config default); feature map "
    "channels [32,64,128,128] (config default, 4 stages at 16x16)")
CIFAR_PRESET = Preset(
    "cifar_small", 32, 3, 32,
    ("dataset=cifar10", "network=cifar10", "network.model_channels=32", "network.num_blocks=2"),
    "the CIFAR-10 DDPM++ layout of conf/network/cifar10.yaml (channel_mult [2,2,2], attention at 16, "
    "dropout 0.2) at a quarter of the width (model_channels 32, not 128) and half the depth (num_blocks 2, "
    "not 4), about 1.9M parameters instead of 56M, on 32x32x3 random images, batch_size 32; feature map "
    "channels [32,64,128,128,128] (config default, 5 stages at 32x32)")
QUICK_NETWORK = ("network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
                 "network.attn_resolutions=[]", "feature_map.channels=[4,4,4,4,4]")


def preset_for(preset: Preset, opts: Options) -> Preset:
    """The preset itself, or a tiny network and batch of the same image size (--quick)."""
    if not opts.quick:
        return preset
    return replace(preset, batch=4, overrides=preset.overrides + QUICK_NETWORK,
                   description=f"quick (tiny) version of: {preset.description}")


def random_feature_map_file(cfg, resolution: int, channels: int, directory: Path) -> str:
    """A randomly initialised feature map, saved the way `ensure_feature_map` saves a trained one."""
    num_labels = AugmentPipeline(cfg.augment, channels).num_labels
    fm = FeatureMap(channels, resolution, list(cfg.feature_map.channels), num_labels,
                    int(cfg.feature_map.convs_per_stage))
    path = directory / f"feature_map_{resolution}x{channels}_{'-'.join(map(str, fm.channels))}.pt"
    torch.save({"kwargs": fm_kwargs(fm), "state_dict": fm.state_dict()}, path)
    return str(path)


def build_step(preset: Preset, overrides: Iterable[str], device: torch.device, workdir: Path, seed: int = 0):
    """(ConsistencyStep, cfg) for `preset` + overrides, through the loop's own `build_training`
    (scratch init: random weights; a random feature map where the loss needs one)."""
    cfg = compose_config([*preset.overrides, *overrides, f"batch_size={preset.batch}", "training.init=scratch",
                          f"seed={seed}"])
    artifacts = Artifacts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if needs_feature_map(cfg):
            artifacts.feature_map = random_feature_map_file(cfg, preset.resolution, preset.channels, workdir)
        torch.manual_seed(seed)     # every variant starts from the same U-Net weights
        step = build_training(cfg, artifacts, WorkerContext(device),
                              SimpleNamespace(resolution=preset.resolution, channels=preset.channels))
    return step, cfg


def random_batch(preset: Preset, cfg, device: torch.device, seed: int = 0) -> Tensor:
    """Images in [-1, 1], in the memory format the loop would hand the step."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(preset.batch, preset.channels, preset.resolution, preset.resolution, generator=gen) * 2 - 1)
    x = x.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def count_parameters(step) -> int:
    return sum(p.numel() for p in unwrap(step.net).parameters())


def lpips_skip_reason(opts: Options) -> str | None:
    if opts.lpips_weights is None:
        return ("no local LPIPS weights (loss.vgg_weights / loss.lin_weights are null and nothing downloads); "
                "pass --lpips-weights VGG16.pth,LPIPS_VGG.pth to time it")
    missing = [p for p in opts.lpips_weights if not Path(p).is_file()]
    return f"LPIPS weight files not found: {missing}" if missing else None


def loss_overrides(loss: str, opts: Options) -> list[str]:
    if loss == "lpips" and opts.lpips_weights:
        vgg, lin = (str(Path(p).resolve()) for p in opts.lpips_weights)
        return ["loss=lpips", f"loss.vgg_weights={vgg}", f"loss.lin_weights={lin}"]
    return [f"loss={loss}"]
