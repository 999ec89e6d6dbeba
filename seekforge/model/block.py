"""One pre-norm transformer block: MLA, then a dense SwiGLU (leading layers) or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from seekforge.model.backend import EXPLICIT, Backend
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
                backend: Backend = EXPLICIT) -> tuple[torch.Tensor, Routing | None]:
        """x [b, s, dim] -> (h + ffn(ffn_norm(h)) where h = x + attn(attn_norm(x)), the MoE's routing as the
        backend reports it; None for a dense FFN). The backend runs each half (`seekforge.model.backend`)."""
        delta = self.attn(x, cos, sin, mask, backend, norm=self.attn_norm)
        return backend.feed_forward(self.ffn_norm, self.ffn, x, delta)
