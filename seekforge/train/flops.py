"""Model FLOPs per token, for throughput and MFU reports (the PaLM-style count: matmuls only)."""

from __future__ import annotations

import torch

from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer


def active_matmul_params(cfg: ModelConfig, with_mtp: bool = False) -> int:
    """Parameters one token multiplies through: all but the embedding table and the idle routed experts."""
    with torch.device("meta"):
        counts = Transformer(cfg if with_mtp else cfg.replace(n_mtp_modules=0)).num_parameters()
    return counts["active"] - counts["embedding"]


def training_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = False) -> float:
    """6 x active matmul parameters, plus causal attention (QK^T and PV) forward and backward."""
    layers = cfg.n_layers + (cfg.n_mtp_modules if with_mtp else 0)
    attention = 3 * layers * cfg.n_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * active_matmul_params(cfg, with_mtp) + attention
