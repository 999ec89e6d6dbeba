"""One pre-norm transformer block: MLA, then a dense SwiGLU (leading layers) or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from seekforge.model.config import ModelConfig
from seekforge.model.mla import MLA
from seekforge.model.mlp import MLP
from seekforge.model.moe import MoE, Routing
from seekforge.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, cos, sin, mask=None,
                absorb: bool = False) -> tuple[torch.Tensor, Routing | None]:
        """x [b, s, dim] -> (output [b, s, dim], the MoE's routing; None for a dense FFN)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, absorb)
        if not isinstance(self.ffn, MoE):
            return x + self.ffn(self.ffn_norm(x)), None
        y, routing = self.ffn(self.ffn_norm(x))
        return x + y, routing
