"""Multi-token prediction (DeepSeek-V3): sequential modules that predict tokens further ahead.

Module k (1-based) at position i combines the previous depth's hidden state h^{k-1}_i with the
embedding of token t_{i+k}, runs one transformer block, and predicts t_{i+k+1} through the shared
output head. Causality is kept at every depth, so at inference the modules draft tokens for
speculative decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from seekforge.model.backend import EXPLICIT, Backend
from seekforge.model.block import Block
from seekforge.model.config import ModelConfig
from seekforge.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # shared_head.norm; the head itself is the model's

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask=None, backend: Backend = EXPLICIT):
        """h_prev, emb_next [b, s, dim] -> (this depth's hidden state [b, s, dim] before self.norm, its block's
        routing as `Block.forward` gives it)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, mask, backend)


def depth_targets(labels: torch.Tensor, k: int, positions: torch.Tensor | None = None,
                  ignore_index: int = -100) -> torch.Tensor:
    """Depth k's targets, labels[:, k:] [b, s - k]: position i predicts what labels[:, i + k] holds. With
    positions [b|1, s], a target is ignored where positions[i + k] != positions[i] + k: token i + k is then
    in another document (positions restart at 0 for each), which position i must not see."""
    targets = labels[:, k:]
    if positions is None:
        return targets
    same_document = positions[:, k:] == positions[:, :-k] + k
    return targets.masked_fill(~same_document, ignore_index)
