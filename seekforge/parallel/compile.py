"""torch.compile applied from outside the model, one transformer block at a time (as torchtitan does):
the elementwise work around the matmuls (RMSNorm, rotary, SwiGLU, routing) fuses into few kernels,
and identical blocks share one compiled graph."""

from __future__ import annotations

import torch

from seekforge.model.moe import _grouped_mm_works
from seekforge.model.transformer import Transformer


def compile_blocks(model: Transformer, dtype: torch.dtype | None = None) -> Transformer:
    """Compile every main block and MTP block in place; returns the model."""
    param = next(model.parameters())
    # settle the grouped-matmul capability probe eagerly so that tracing never runs it
    _grouped_mm_works(torch.empty(0, device=param.device, dtype=dtype or param.dtype), param)
    for block in model.blocks():
        block.compile(dynamic=False)  # in place: parameter names (checkpoints, HF export) are unchanged
    return model
