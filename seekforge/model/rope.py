"""Rotary position embedding with DeepSeek's interleaved pairs and YaRN context extension.

Only the decoupled rotary part of queries and keys (qk_rope_head_dim wide) is rotated; pairs are
adjacent elements (x0, x1), (x2, x3), ... as in DeepSeek's checkpoints. YaRN interpolates the
frequencies between beta_fast and beta_slow rotations and scales cos/sin by the mscale ratio; the
matching softmax temperature lives in ModelConfig.softmax_scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seekforge.model.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim / 2] (fp32) and the factor applied to cos and sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor <= 1.0:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # high-frequency dims (ramp 0) keep their frequency, low-frequency ones (ramp 1) are interpolated
    inv_freq = inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)
    if cfg.mscale and cfg.mscale_all_dim:
        factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    else:
        factor = yarn_mscale(cfg.rope_factor)
    return inv_freq, factor


class RotaryEmbedding(nn.Module):
    """cos and sin of the positions' angles. The frequencies stay fp32 whatever the model is cast to (as
    transformers keeps them): rounded to bf16 they are off by up to 2^-9 of themselves, so the fastest pair's
    angle at position 160 by up to 0.3 rad, and by radians past a thousand tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2, dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        inv_freq, self.scale = rope_frequencies(self.cfg)
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(inv_freq)

    def _apply(self, fn, recurse=True):
        """Moves and casts (`model.to(torch.bfloat16)`, `to_empty`) reach the buffer too: where one changed its
        dtype, the frequencies are computed again in fp32 where it now lives."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=self.inv_freq.device)
            self.reset_parameters()
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., seq] (int) -> cos, sin of shape [..., seq, qk_rope_head_dim / 2] in fp32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.scale, angles.sin() * self.scale
