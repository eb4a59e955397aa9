"""What every local torch-fidelity feature extractor here shares: weights from a local file
(nothing downloads at run time), no torch.compile, and uint8 RGB batches checked on the way in."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert


class LocalFeatureExtractor(FeatureExtractorBase):
    """A torch-fidelity extractor whose network is loaded from `feature_extractor_weights_path`."""

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    @staticmethod
    def check_input(x: Tensor) -> None:
        """torch-fidelity's contract: a uint8 batch B x 3 x H x W."""
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
