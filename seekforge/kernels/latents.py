"""A decode step's new latents into the paged cache, in Triton: normalised, rotated and written in one launch.

What a token caches is wkv_a's output [c + r] made into the latent (RMSNorm over the first c, `MLA.kv_norm`) and
the shared rotary key (adjacent pairs of the last r rotated, `apply_rotary`). In the compiled decode block that
is an elementwise kernel (the norm, the rotation, their concatenation) and then the store (index_copy, 2.4 us a
layer at batch 1 on the H200): here one program a token reads its row once and writes its cache slot. Rounding
as the model's: the norm and the rotation in fp32, each result in the cache's dtype, the norm weight applied to
the rounded normalised value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError


@triton.jit
def rotate_pairs(src, dst, cos_at, sin_at, mask):
    """Adjacent pairs (src[2p], src[2p + 1]) turned by angle p (cos/sin at cos_at, sin_at: pointers of p's shape),
    as `apply_rotary` turns them, in fp32, written to dst[2p], dst[2p + 1] in dst's dtype."""
    x0 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_at, mask=mask, other=0.0)
    sin = tl.load(sin_at, mask=mask, other=0.0)
    tl.store(dst, (x0 * cos - x1 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + 1, (x0 * sin + x1 * cos).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def store_latent_row(t, kv_ptr, g_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, eps, C, R, stride_kv, stride_angles,
                     stride_map, stride_slot, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Token t's latent into its cache slot (also a part of `seekforge.kernels.gemv.latent_query`'s launch). The slot
    mapping is read at its stride: a captured step's is a column of its static input rows."""
    row = kv_ptr + t * stride_kv
    out = cache_ptr + tl.load(slot_ptr + t * stride_map).to(tl.int64) * stride_slot
    cs = tl.arange(0, BLOCK_C)
    kv = tl.load(row + cs, mask=cs < C, other=0.0)
    x = kv.to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)).to(kv.dtype)
    g = tl.load(g_ptr + cs, mask=cs < C, other=0.0)
    tl.store(out + cs, (normed.to(tl.float32) * g.to(tl.float32)).to(cache_ptr.dtype.element_ty), mask=cs < C)
    ps = tl.arange(0, BLOCK_P)  # rotary pairs at r offsets 2p, 2p + 1
    rotate_pairs(row + C + 2 * ps, out + C + 2 * ps, cos_ptr + t * stride_angles + ps,
                 sin_ptr + t * stride_angles + ps, ps < R // 2)


@triton.jit
def _store_new_latents(kv_ptr, g_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, eps, C, R, stride_kv, stride_angles,
                       stride_map, stride_slot, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    store_latent_row(tl.program_id(0), kv_ptr, g_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, eps, C, R, stride_kv,
                     stride_angles, stride_map, stride_slot, BLOCK_C, BLOCK_P)


def check_store(cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor) -> None:
    n, width = kv_a.shape
    if cache.shape[-1] != width or cache.stride(-1) != 1 or cache.stride(-2) != width or slot_mapping.shape != (n,):
        raise ConfigError(f"store_new_latents wants a cache [blocks, block_size, c + r] with contiguous rows, kv_a "
                          f"[n, c + r] and slot_mapping [n]; got cache {tuple(cache.shape)} strides {cache.stride()}, "
                          f"kv_a {tuple(kv_a.shape)}, slot_mapping {tuple(slot_mapping.shape)}")


# Writes the cache in place: an op torch.compile keeps opaque, so the compiled block never copies the cache.
@torch.library.custom_op("seekforge::store_new_latents", mutates_args=("cache",))
def store_new_latents(cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """kv_a [n, c + r] (wkv_a's output for n new tokens, c = norm_weight's size) -> cache slots slot_mapping [n]
    of one layer's cache [blocks, block_size, c + r]: RMSNorm(kv_a[:, :c]) * norm_weight, then kv_a[:, c:]
    rotated by cos/sin [n, r / 2] (fp32)."""
    n, width = kv_a.shape
    c = norm_weight.shape[0]
    check_store(cache, slot_mapping, kv_a)
    if n == 0:
        return
    angles = cos.stride(0)
    if sin.stride(0) != angles or cos.stride(1) != 1 or sin.stride(1) != 1 or kv_a.stride(1) != 1:
        cos, sin, kv_a = cos.contiguous(), sin.contiguous(), kv_a.contiguous()
        angles = cos.stride(0)
    _store_new_latents[(n,)](kv_a, norm_weight, cos, sin, slot_mapping, cache, eps, c, width - c, kv_a.stride(0),
                             angles, slot_mapping.stride(0), cache.shape[-1], BLOCK_C=triton.next_power_of_2(c),
                             BLOCK_P=triton.next_power_of_2(max((width - c) // 2, 1)))


@store_new_latents.register_fake
def _(cache, slot_mapping, kv_a, norm_weight, eps, cos, sin) -> None:
    return None


__all__ = ["store_new_latents"]
