"""One pre-norm transformer block: MLA, then a dense SwiGLU (leading layers) or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from seekforge.model.config import ModelConfig
from seekforge.model.mla import MLA
from seekforge.model.mlp import MLP
from seekforge.model.moe import MoE
from seekforge.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, cos, sin, mask=None, absorb: bool = False) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, absorb)
        return x + self.ffn(self.ffn_norm(x))
