"""Exponential moving average of the weights: what is sampled and evaluated (ALGORITHM §6)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA of a network's parameters and buffers.

    Decay is either fixed per step, or a half-life in images (edm2's ``ema_halflife_kimg``)
    so that runs at different batch sizes average over the same number of images.
    """

    def __init__(self, net: nn.Module, decay: float = 0.999, halflife_kimg: float | None = None):
        self.decay = float(decay)
        self.halflife_kimg = halflife_kimg
        self.model = copy.deepcopy(net).eval().requires_grad_(False)

    def beta(self, batch_size: int) -> float:
        if self.halflife_kimg:
            return 0.5 ** (batch_size / (float(self.halflife_kimg) * 1000.0))
        return self.decay

    @torch.no_grad()
    def update(self, net: nn.Module, batch_size: int) -> None:
        beta = self.beta(batch_size)
        ema_p = [p for p in self.model.parameters()]
        net_p = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_p, net_p, 1.0 - beta)
        for b_ema, b_net in zip(self.model.buffers(), net.buffers()):
            b_ema.copy_(b_net)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
