"""DINOv2 features from local weights, for FD_DINOv2 (Stein et al., NeurIPS 2023; edm2's FD_DINOv2).

torch-fidelity's own DINOv2 extractor loads the model code and weights through `torch.hub`
(the internet) and refuses a weights file. Here the ViT is built from the state dict the
DINOv2 release ships (`dinov2_vits14_pretrain.pth`, ..._vitb14_, ..._vitl14_; keys as in
facebookresearch/dinov2's `DinoVisionTransformer` with block_chunks=0): its sizes are read
from the tensors (width from `cls_token`, depth from the block count, 64 dimensions per head
as in every DINOv2 ViT), so a small stand-in with the same keys loads the same way. The giant
model's SwiGLU feed-forward and the register-token variants are refused by name.

The extractor `ayt-dinov2` is registered with torch-fidelity and preprocesses exactly as its
`dinov2-vit-*` extractors do: uint8 RGB, TF1-compatible bilinear resize to 224, ImageNet
normalisation; the feature is the final-norm class token.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ayt.errors import ConfigError
from ayt.eval.extractor import LocalFeatureExtractor

DINOV2_EXTRACTOR = "ayt-dinov2"
INPUT_SIZE = 224                    # torch-fidelity's FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
HEAD_DIM = 64                       # every DINOv2 ViT (S/14: 384 = 6 x 64, B: 12 x 64, L: 16 x 64)
POS_OFFSET = 0.1                    # DINOv2's interpolate_offset: avoids a floating-point off-by-one
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + γ₁·attn(LN x), then x + γ₂·mlp(LN x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + self.ls1.gamma * self.attn.proj(attended)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoV2(nn.Module):
    """DINOv2's ViT (patch 14) with the release's parameter names; forward -> class token [B, D]."""

    def __init__(self, dim: int, depth: int, hidden: int, grid: int, patch: int = 14):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))     # training only; in the release's state dict
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position(self, tokens: int, size: int) -> Tensor:
        """The position embedding resized (bicubic) from the trained grid to this input's, as
        DinoVisionTransformer.interpolate_pos_encoding does."""
        grid = int(math.sqrt(self.pos_embed.shape[1] - 1))
        side = size // self.patch
        if side == grid:
            return self.pos_embed
        patches = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        scale = (side + POS_OFFSET) / grid
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, side * side, -1)
        return torch.cat((self.pos_embed[:, :1].float(), patches), dim=1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.position(tokens.shape[1], x.shape[-1])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def load_dinov2(path: str | os.PathLike) -> DinoV2:
    """The ViT of a DINOv2 release state dict (or a stand-in with the same keys)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                                     # noqa: BLE001 - any unreadable file
        raise ConfigError("eval.dinov2_weights", f"cannot read {path} ({type(err).__name__})") from None
    if not isinstance(state, dict) or "cls_token" not in state or "pos_embed" not in state:
        raise ConfigError("eval.dinov2_weights", f"{path} is not a DINOv2 ViT state dict (no cls_token/pos_embed)")
    if "register_tokens" in state or any(".mlp.w12." in k for k in state):
        raise ConfigError("eval.dinov2_weights", f"{path}: register-token and SwiGLU (ViT-g) variants are not "
                                                 "supported; use the ViT-S/B/L-14 release weights")
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = int(math.sqrt(state["pos_embed"].shape[1] - 1))
    net = DinoV2(dim, depth, state["blocks.0.mlp.fc1.weight"].shape[0], grid, state["patch_embed.proj.weight"].shape[-1])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError("eval.dinov2_weights", f"{path}: {str(err).splitlines()[0]}") from None
    return net.eval().requires_grad_(False)


def write_random_dinov2_weights(path: str | os.PathLike, dim: int = HEAD_DIM, depth: int = 2, grid: int = 4,
                                seed: int = 0) -> str:
    """A small randomly initialised DINOv2-shaped state dict: the stand-in tests load offline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DinoV2(dim, depth, 4 * dim, grid)
        for p in net.parameters():
            nn.init.normal_(p, std=0.02)
        for block in net.blocks:
            nn.init.ones_(block.norm1.weight), nn.init.ones_(block.norm2.weight)
        nn.init.ones_(net.norm.weight)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(net.state_dict(), path)
    return str(path)


class DinoV2FeatureExtractor(LocalFeatureExtractor):
    """torch-fidelity extractor `ayt-dinov2` around `load_dinov2(feature_extractor_weights_path)`."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, f"{name} needs feature_extractor_weights_path")
        self.model = load_dinov2(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "dinov2"

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        self.check_input(x)
        h = interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE),
                                                      align_corners=False)
        mean = torch.tensor(MEAN, device=h.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(STD, device=h.device).view(1, 3, 1, 1) * 255
        return (self.model((h - mean) / std).to(torch.float32),)


if DINOV2_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:     # a second import (e.g. reload) must not fail
    register_feature_extractor(DINOV2_EXTRACTOR, DinoV2FeatureExtractor)
