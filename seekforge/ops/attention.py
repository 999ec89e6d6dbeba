"""Explicit (dense) attention for prefill, through scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def values_padded_for_sdpa(device: torch.device) -> bool:
    """Whether `dense_attention` should zero-pad MLA's values (v_head_dim < qk_head_dim) to the key width: the
    fused kernel scaled_dot_product_attention picks on the CPU and on GPUs before Hopper is flash attention,
    which wants equal widths (unfused, several times slower on the CPU); from Hopper on it picks cuDNN's, which
    takes narrower values, faster than padded, and the pad and the slice of the output cost two copies more."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    softmax_scale: float, pad_values: bool) -> torch.Tensor:
    """Explicit attention for prefill: q [b, s, h, d], k [b, t, h, d], v [b, t, h, d_v]; mask bool [b, s, t]
    (True = may attend) or None for causal over s == t. Returns [b, s, h, d_v]. `pad_values`: zero-pad v
    to d and cut the padding from the output (`values_padded_for_sdpa` says where that pays)."""
    dv = v.shape[-1]
    if pad_values and q.shape[-1] > dv:
        v = F.pad(v, (0, q.shape[-1] - dv))
    return dot_product_attention(q, k, v, mask, softmax_scale)[..., :dv]


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          softmax_scale: float) -> torch.Tensor:
    """q [b, s, h, d], k [b, t, h, d], v [b, t, h, d_v]; mask bool [b|1, s, t] (True = may attend) or None for
    causal over s == t -> [b, s, h, d_v], through F.scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if mask is None else mask.unsqueeze(1),
                                         is_causal=mask is None, scale=softmax_scale)
    return out.transpose(1, 2)
