"""The SwiGLU feed-forward used by the leading dense layers and the shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from seekforge.ops.gemv import projections


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = projections(x, self.w1, self.w3)  # together: FP8 layers quantise x once for both
        return self.w2(F.silu(gate) * up)
