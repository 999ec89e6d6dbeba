"""A decode step's new latents into the paged cache, and absorbed MLA's latent query, in Triton.

What a token caches is wkv_a's output [c + r] made into the latent (RMSNorm over the first c, `MLA.kv_norm`) and
the shared rotary key (adjacent pairs of the last r rotated, `apply_rotary`). In the compiled decode block that
is an elementwise kernel (the norm, the rotation, their concatenation) and then the store (index_copy): here one
program a token reads its row once and writes its cache slot (`store_new_latents_kernel`). Rounding as the model's:
the norm and the rotation in fp32, each result in the cache's dtype, the norm weight applied to the rounded
normalised value.

The latent query of a small decode step (`latent_query_kernel`) is W_UK's product beside the rotated rope part of
the query, in one launch where the compiled block ran three; it can take the step's cache store in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.triton.gemv import GEMV_ROWS, gemv_tile
from seekforge.ops.triton.pdl import wait_for_inputs
from seekforge.ops.triton.tuning import default_config, launch_tiled, tile_of, tuned


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
    """Token t's latent into its cache slot (also a part of `latent_query_kernel`'s launch). The slot
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
def store_new_latents_kernel(cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor,
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


@store_new_latents_kernel.register_fake
def _(cache, slot_mapping, kv_a, norm_weight, eps, cos, sin) -> None:
    return None


@triton.jit
def _latent_query(x_ptr, w_ptr, y_ptr, pe_ptr, cos_ptr, sin_ptr, kv_ptr, g_ptr, slot_ptr, cache_ptr, eps, M, N, K, R,
                  C_KV, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn, stride_wk, stride_ym, stride_yb,
                  stride_pm, stride_pb, stride_angles, stride_kv, stride_map, stride_slot, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, STORE: tl.constexpr,
                  BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Per head b: y[:, b, :N] = x[:, b] W[b]^T (the GEMV's programs), y[:, b, N:N + R] = pe[:, b] rotated by
    cos/sin (one more program a head), adjacent pairs as `apply_rotary` turns them, in fp32. STORE: one more
    program a head puts the new tokens' latents (kv, C_KV + R wide) into their cache slots, as
    `store_new_latents_kernel` does, tokens b, b + heads, ... (work that does not wait for the query: one launch fewer in the chain)."""
    b, pid = tl.program_id(1), tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK_N)
    if pid < tiles:
        gemv_tile(x_ptr, w_ptr, y_ptr, b, pid, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn,
                  stride_wk, stride_ym, stride_yb, BLOCK_M, BLOCK_N, BLOCK_K, PDL)
    elif pid == tiles:
        wait_for_inputs(PDL)
        rows = tl.arange(0, BLOCK_M)[:, None]
        ps = tl.arange(0, BLOCK_P)[None, :]
        rotate_pairs(pe_ptr + b * stride_pb + rows * stride_pm + 2 * ps, y_ptr + b * stride_yb + rows * stride_ym + N
                     + 2 * ps, cos_ptr + rows * stride_angles + ps, sin_ptr + rows * stride_angles + ps,
                     (rows < M) & (ps < R // 2))
    else:
        wait_for_inputs(PDL)
        if STORE:
            for t in range(b, M, tl.num_programs(1)):
                store_latent_row(t, kv_ptr, g_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, eps, C_KV, R, stride_kv,
                                 stride_angles, stride_map, stride_slot, BLOCK_C, BLOCK_P)


_latent_query_tuned = tuned(_latent_query, ["M", "N", "K", "R", "stride_wb", "stride_wn", "stride_wk"])


def latent_query_kernel(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, store: tuple | None = None) -> torch.Tensor:
    """Absorbed MLA's latent query of a small decode step in one launch: q_nope [n, h, d] through W_UK
    (w_uk [h, c, d], any strides, as `head_gemv` takes it) beside q_pe [n, h, r] rotated by cos/sin [n, r / 2]
    (fp32) -> [n, h, c + r], i.e. torch.cat([head_gemv(q_nope, w_uk), apply_rotary(q_pe, cos, sin)], -1),
    without the rotation's and the concatenation's own kernels. n <= GEMV_ROWS. store: (cache, slot_mapping,
    kv_a, norm_weight, eps), the arguments of `store_new_latents_kernel` for the same n tokens
    (their rotary keys r wide, turned by the same cos/sin), done in the same launch."""
    n, h, d = q_nope.shape
    r = q_pe.shape[-1]
    if (q_pe.shape[:2] != (n, h) or w_uk.dim() != 3 or w_uk.shape[0] != h or w_uk.shape[2] != d or n > GEMV_ROWS
            or q_pe.stride(-1) != 1 or cos.shape != (n, r // 2) or sin.shape != cos.shape or r % 2
            or len({q_nope.dtype, q_pe.dtype, w_uk.dtype}) != 1):
        raise ConfigError(f"latent_query wants q_nope [n <= {GEMV_ROWS}, h, d], q_pe [n, h, r] (r even, contiguous "
                          f"pairs), w_uk [h, c, d] of one dtype and cos/sin [n, r / 2]; got q_nope "
                          f"{tuple(q_nope.shape)} {q_nope.dtype}, q_pe {tuple(q_pe.shape)} {q_pe.dtype}, w_uk "
                          f"{tuple(w_uk.shape)} {w_uk.dtype}, cos {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if store is None:
        return launch_latent_query(q_nope, q_pe, w_uk, cos, sin, None)  # the shape's tuned tile
    cache, slot_mapping, kv_a, norm_weight, eps = store
    check_store(cache, slot_mapping, kv_a)
    if kv_a.shape != (n, norm_weight.shape[0] + r):
        raise ConfigError(f"latent_query's store wants kv_a [n, c + r] = [{n}, {norm_weight.shape[0] + r}] for its "
                          f"{n} tokens and rotary width {r}; got {tuple(kv_a.shape)}")
    return launch_latent_query_storing(q_nope, q_pe, w_uk, cos, sin, cache, slot_mapping, kv_a.contiguous(),
                                       norm_weight, eps, None)


def _launch_latent_query(q_nope, q_pe, w_uk, cos, sin, tile, store: tuple | None) -> torch.Tensor:
    n, h, d = q_nope.shape
    c, r = w_uk.shape[1], q_pe.shape[-1]
    y = q_nope.new_empty(n, h, c + r)
    if n == 0:
        return y
    cache, slot_mapping, kv_a, norm_weight, eps = store or (y, y, y, y, 0.0)  # unread without STORE
    c_kv = norm_weight.shape[0] if store else 0
    args = (q_nope, w_uk, y, q_pe, cos, sin, kv_a, norm_weight, slot_mapping, cache, eps, n, c, d, r, c_kv,
            q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), w_uk.stride(0), w_uk.stride(1), w_uk.stride(2),
            y.stride(0), y.stride(1), q_pe.stride(0), q_pe.stride(1), cos.stride(0), kv_a.stride(0),
            slot_mapping.stride(0), cache.shape[-1])
    meta = {"BLOCK_M": triton.next_power_of_2(n), "BLOCK_P": triton.next_power_of_2(max(r // 2, 1)),
            "STORE": store is not None, "BLOCK_C": triton.next_power_of_2(max(c_kv, 1))}
    extra = 2 if store else 1
    launch_tiled(_latent_query, _latent_query_tuned, lambda block_n: (triton.cdiv(c, block_n) + extra, h), args,
                 meta, tile, ("latent_query", n, h, c, d, r, q_nope.dtype, w_uk.stride(), q_nope.device, extra),
                 tile_of(default_config(w_uk), d))
    return y


@torch.library.custom_op("seekforge::latent_query", mutates_args=())
def launch_latent_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, tile: list[int] | None) -> torch.Tensor:
    return _launch_latent_query(q_nope, q_pe, w_uk, cos, sin, tile, None)


@launch_latent_query.register_fake
def _(q_nope, q_pe, w_uk, cos, sin, tile):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[1] + q_pe.shape[-1])


# Writes the cache in place, as `store_new_latents_kernel` does: opaque to torch.compile, which never copies the cache.
@torch.library.custom_op("seekforge::latent_query_storing", mutates_args=("cache",))
def launch_latent_query_storing(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                                kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                tile: list[int] | None) -> torch.Tensor:
    return _launch_latent_query(q_nope, q_pe, w_uk, cos, sin, tile, (cache, slot_mapping, kv_a, norm_weight, eps))


@launch_latent_query_storing.register_fake
def _(q_nope, q_pe, w_uk, cos, sin, cache, slot_mapping, kv_a, norm_weight, eps, tile):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[1] + q_pe.shape[-1])


__all__ = ["latent_query_kernel", "store_new_latents_kernel"]
