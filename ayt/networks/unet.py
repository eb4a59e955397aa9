"""DDPM++-style U-Net: the raw network F inside the EDM denoiser (ALGORITHM §1).

Follows the layout of the DDPM++ configuration of NVlabs/edm's ``SongUNet`` (standard
encoder/decoder, 2x2 average-pool down / nearest up, one attention head, skip scale
sqrt(1/2), noise embedding -> 2-layer MLP of width 4·model_channels), written afresh.
One deliberate difference by default: levels change by parameter-free resampling rather
than by a residual block (``resample_blocks``), which brings the CPU preset to 1.47M
parameters (1.75M otherwise) and the CIFAR-10 preset to 50.2M; ``resample_blocks=True``
gives exactly edm's 55.73M DDPM++ CIFAR-10 net of the ECT/AYT papers.

Everything is out-of-place and shape-static, so ``torch.compile`` and channels_last
memory format work. Dropout is ``F.dropout``: it draws from the global torch RNG, so
the trainer can replay the RNG state to share one dropout mask between the two forward
passes of a consistency pair (ALGORITHM §3).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ayt.errors import ConfigError

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of residual sums constant (DDPM++)


def _init(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """Xavier-uniform weights times ``scale``, zero bias (edm's DDPM++ initialisation)."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with at least 4 channels per group, so tiny widths still work."""
    return nn.GroupNorm(num_groups=max(1, min(32, channels // 4)), num_channels=channels, eps=1e-6)


# --- noise embeddings: c_noise [B] -> [B, channels] ------------------------------------


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids with geometric frequencies 1 .. 1/max_positions (DDPM++)."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features with fixed Gaussian frequencies (NCSN++ style)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        # A buffer, not a parameter: the frequencies are part of the checkpoint, never trained.
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.to(self.freqs.dtype)[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([arg.cos(), arg.sin()], dim=1)


EMBEDDINGS: dict[str, type[nn.Module]] = {
    "positional": PositionalEmbedding,
    "fourier": FourierEmbedding,
}


# --- building blocks -------------------------------------------------------------------


def resample(x: Tensor, *, down: bool = False, up: bool = False) -> Tensor:
    """2x2 box-filter downsampling / nearest upsampling: edm's [1,1] resampling filter."""
    if down:
        return F.avg_pool2d(x, 2)
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class Resample(nn.Module):
    """Parameter-free change of level (``resample_blocks=False``); ignores the embedding."""

    def __init__(self, channels: int, *, down: bool = False, up: bool = False):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.down, self.up = down, up

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return resample(x, down=self.down, up=self.up)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, + noise embedding, GN-SiLU-dropout-conv, optional
    2x down/up-sampling, optional single-head self-attention after the residual sum."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        down: bool = False,
        up: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.down, self.up, self.dropout = down, up, dropout
        self.norm0 = group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, out_channels))
        self.norm1 = group_norm(out_channels)
        # Near-zero last conv: every block starts close to the identity (as edm does).
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=1e-5)
        self.skip = None
        if in_channels != out_channels or down or up:
            self.skip = _init(nn.Conv2d(in_channels, out_channels, 1))
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = _init(nn.Conv2d(out_channels, 3 * out_channels, 1), scale=math.sqrt(0.2))
            self.proj = _init(nn.Conv2d(out_channels, out_channels, 1), scale=1e-5)

    def _resample(self, x: Tensor) -> Tensor:
        return resample(x, down=self.down, up=self.up)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = F.silu(self.norm1(h))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        res = self._resample(orig)
        if self.skip is not None:
            res = self.skip(res)
        x = (h + res) * SKIP_SCALE
        if self.attention:
            x = (x + self._attend(self.norm2(x))) * SKIP_SCALE
        return x

    def _attend(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        # [B, 3C, H, W] -> three [B, 1 head, HW, C]
        qkv = self.qkv(x).reshape(b, 3, c, hgt * wid).transpose(2, 3)
        q, k, v = qkv.unbind(dim=1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
        out = out[:, 0].transpose(1, 2).reshape(b, c, hgt, wid)
        return self.proj(out)


# --- the U-Net --------------------------------------------------------------------------


class UNet(nn.Module):
    """DDPM++ U-Net ``F(x, c_noise)``: [B, in_channels, R, R] x [B] -> [B, out_channels, R, R].

    Level ``l`` works at resolution ``R / 2^l`` with ``model_channels * channel_mult[l]``
    channels and ``num_blocks`` residual blocks (``num_blocks + 1`` in the decoder, each
    fed one encoder skip). Blocks at a resolution in ``attn_resolutions`` end with
    self-attention (resolutions the net never reaches are ignored); the bottleneck always
    has one attention block, as in DDPM++.

    Levels change by parameter-free 2x2 average pooling / nearest upsampling by default;
    ``resample_blocks=True`` uses DDPM++'s residual blocks there instead. Parameter counts
    (conf/network presets): cpu at 16x16x1 1.47M (1.75M with resample blocks); cifar10 at
    32x32x3 50.2M (55.73M with resample blocks, exactly edm's DDPM++ CIFAR-10 net).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        model_channels: int = 32,  # base width; level widths are multiples of it
        channel_mult: Sequence[int] = (1, 2, 2),  # width multiplier per resolution level
        num_blocks: int = 2,  # residual blocks per level in the encoder
        attn_resolutions: Sequence[int] = (8,),  # resolutions with self-attention
        dropout: float = 0.2,  # dropout probability inside residual blocks
        embedding: str = "positional",  # noise embedding: positional | fourier
        resample_blocks: bool = False,  # residual blocks at down/up-sampling (True: exact edm DDPM++)
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = {int(r) for r in attn_resolutions}
        levels = len(channel_mult)
        if levels < 1 or img_resolution % (2 ** (levels - 1)) != 0:
            raise ConfigError(
                "network.channel_mult",
                f"{levels} levels need an image resolution divisible by {2 ** max(levels - 1, 0)}, "
                f"got {img_resolution}",
            )
        if embedding not in EMBEDDINGS:
            raise ConfigError("network.embedding", f"unknown {embedding!r}; allowed: {sorted(EMBEDDINGS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("network.dropout", f"must be in [0, 1), got {dropout}")
        if model_channels < 1:
            raise ConfigError("network.model_channels", f"must be >= 1, got {model_channels}")
        if num_blocks < 1:
            raise ConfigError("network.num_blocks", f"must be >= 1, got {num_blocks}")

        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        emb_channels = 4 * model_channels
        self.map_noise = EMBEDDINGS[embedding](model_channels)
        self.map_layer0 = _init(nn.Linear(model_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))
        block = dict(emb_channels=emb_channels, dropout=dropout)

        # Encoder: input conv, then per level an optional downsampling block and num_blocks blocks.
        self.in_conv = _init(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        self.enc = nn.ModuleList()
        skip_channels = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(self._level_change(cout, block, resample_blocks, down=True))
                skip_channels.append(cout)
            for _ in range(num_blocks):
                self.enc.append(ResBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                skip_channels.append(cout)

        # Decoder: bottleneck pair at the lowest level, then per level an optional upsampling
        # block and num_blocks + 1 blocks that each concatenate one encoder skip.
        self.dec = nn.ModuleList()
        self._dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec.append(ResBlock(cout, cout, attention=True, **block))
                self.dec.append(ResBlock(cout, cout, **block))
                self._dec_takes_skip += [False, False]
            else:
                self.dec.append(self._level_change(cout, block, resample_blocks, up=True))
                self._dec_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(ResBlock(cin, cout, attention=attn, **block))
                self._dec_takes_skip.append(True)
        assert not skip_channels  # every encoder output is consumed exactly once

        self.out_norm = group_norm(cout)
        self.out_conv = _init(nn.Conv2d(cout, out_channels, 3, padding=1), scale=1e-5)

    @staticmethod
    def _level_change(channels: int, block: dict, resample_blocks: bool, **direction: bool) -> nn.Module:
        if resample_blocks:
            return ResBlock(channels, channels, **direction, **block)
        return Resample(channels, **direction)

    def forward(self, x: Tensor, noise_labels: Tensor) -> Tensor:
        """x: [B, in_channels, R, R]; noise_labels: [B] (c_noise) -> [B, out_channels, R, R]."""
        emb = self.map_noise(noise_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        x = self.in_conv(x)
        skips = [x]
        for blk in self.enc:
            x = blk(x, emb)
            skips.append(x)
        for blk, takes_skip in zip(self.dec, self._dec_takes_skip):
            if takes_skip:
                x = torch.cat([x, skips.pop().to(x.dtype)], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
