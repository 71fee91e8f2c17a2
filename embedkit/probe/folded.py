"""A linear head with the probe's preprocessing folded into its weights, as a torch module (for CAMs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FoldedLinear(nn.Module):
    """Raw features [B, D] -> logits [B, K]: optional L2 normalisation, then one affine map."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, l2: bool = False):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.l2 = l2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linear.weight.dtype)
        return self.linear(F.normalize(x, dim=1) if self.l2 else x)
