"""Absorbed-MLA decode attention over the paged latent cache, in Triton (FlashMLA-like).

The same function as `seekforge.ops.mla_decode.paged_mla_decode`: each cached token's latent [c + r] is
the key (all c + r dims) and its first c dims the value. Attention over it is bound by reading the cache,
so every program loads each cache tile once for all the heads it holds: the rows of its dot products
(M = queries x heads) are the (query, head) pairs of one sequence. When sequences x head groups are too
few to fill the GPU, each sequence's context is cut into `num_splits` pieces (flash-decoding); each piece
writes its normalised partial output and log-sum-exp, and a second small kernel combines them.

No host synchronisation: the grid depends on shapes only; context lengths (the last query position + 1)
are read on the device, and each split takes an equal share of its own sequence's tiles, so a plan over a
wide static block table (CUDA graphs) costs only the tokens actually cached.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.triton.pdl import launch_options, wait_for_inputs

_LOG2E = 1.4426950408889634
_COMBINE_ROWS = 4  # output rows per combining program


@triton.jit
def _mla_decode_split(
    q_ptr, cache_ptr, table_ptr, pos_ptr, out_ptr, lse_ptr,
    qk_scale,  # softmax_scale * log2(e): the softmax runs in base 2
    num_heads, num_splits, max_tokens,
    stride_qb, stride_qs, stride_qh,
    stride_cb, stride_ct,
    stride_tb, stride_tn,
    stride_pb, stride_ps,
    stride_ob, stride_os, stride_oh, stride_ok,
    S: tl.constexpr, C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr,
    SQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)  # the query, and the newest latents in the cache, come from the kernel before
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    M: tl.constexpr = SQ * BLOCK_H

    rows = tl.arange(0, M)
    qi = rows // BLOCK_H
    head = head_block * BLOCK_H + rows % BLOCK_H
    row_ok = (qi < S) & (head < num_heads)
    pos = tl.load(pos_ptr + seq * stride_pb + qi * stride_ps, mask=qi < S, other=-1).to(tl.int32)

    # This split's share of its sequence's tiles: whole tiles, so a tile never straddles two splits.
    # The context ends at the last query (queries come in position order).
    last = tl.load(pos_ptr + seq * stride_pb + (S - 1) * stride_ps).to(tl.int32)
    ctx_len = tl.minimum(last + 1, max_tokens)
    tiles = (ctx_len + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + num_splits - 1) // num_splits
    start = split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, ctx_len)

    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R
    q_row = q_ptr + seq * stride_qb + qi * stride_qs + head * stride_qh
    q_c = tl.load(q_row[:, None] + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    q_r = tl.load(q_row[:, None] + C + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_C], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table_row = table_ptr + seq * stride_tb
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        t_ok = t < end
        if PAGE % BLOCK_N == 0:  # the tile lies in one cache block: one table read, contiguous rows
            block = tl.load(table_row + (t0 // PAGE) * stride_tn).to(tl.int64)
            kv_row = cache_ptr + block * stride_cb + (t0 % PAGE + offs_n) * stride_ct
        else:
            block = tl.load(table_row + (t // PAGE) * stride_tn, mask=t_ok, other=0).to(tl.int64)
            kv_row = cache_ptr + block * stride_cb + (t % PAGE) * stride_ct
        k_c = tl.load(kv_row[:, None] + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        k_r = tl.load(kv_row[:, None] + C + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)

        s = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)  # scores [M, BLOCK_N]
        s = tl.dot(q_r, tl.trans(k_r), s, input_precision=PRECISION)
        s = tl.where(t[None, :] <= pos[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays at zero
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(k_c.dtype), k_c, acc * alpha[:, None], input_precision=PRECISION)  # values: first C
        m_i = m_new

    seen = l_i > 0.0  # false for padding rows and for queries that see none of this split's keys
    l_i = tl.where(seen, l_i, 1.0)
    o = acc / l_i[:, None]
    o_row = out_ptr + seq * stride_ob + qi * stride_os + head * stride_oh
    if SPLIT:
        o_row += split * stride_ok
        lse_at = lse_ptr + ((seq * S + qi) * num_heads + head) * num_splits + split  # lse is [b, s, h, splits]
        tl.store(lse_at, tl.where(seen, m_i + tl.math.log2(l_i), float("-inf")), mask=row_ok)
    tl.store(o_row[:, None] + offs_c[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _mla_decode_combine(part_ptr, lse_ptr, out_ptr, num_rows, num_splits,
                        C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SPLITS: tl.constexpr,
                        PDL: tl.constexpr):
    """out[row] = sum_k w_k part[row, k] / sum_k w_k with w_k = 2^(lse_k - max lse), for ROWS of the flat
    [b * s * h] rows (the layout of part, lse and out alike) and BLOCK_C of their C columns. Every split is
    loaded at once (SPLITS >= num_splits, a power of two): two dependent loads, not one per split."""
    wait_for_inputs(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, SPLITS)
    row_ok = rows < num_rows
    at = rows[:, None] * num_splits + offs_k[None, :]  # [ROWS, SPLITS]
    lse = tl.load(lse_ptr + at, mask=row_ok[:, None] & (offs_k < num_splits)[None, :], other=float("-inf"))
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows past the end, or that saw nothing anywhere
    w = tl.math.exp2(lse - m[:, None])  # 0 for empty splits, which wrote nothing worth reading
    seen = lse > float("-inf")
    part = tl.load(part_ptr + at[:, :, None] * C + offs_c[None, None, :],
                   mask=seen[:, :, None] & (offs_c < C)[None, None, :], other=0.0)  # [ROWS, SPLITS, BLOCK_C]
    den = tl.sum(w, axis=1)
    den = tl.where(den > 0.0, den, 1.0)
    acc = tl.sum(part * w[:, :, None], axis=1)
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_c < C)[None, :])


@dataclass(frozen=True)
class DecodeConfig:
    """How one call is cut into programs. `block_h` heads per program (its M rows are s x block_h),
    `block_n` cache tokens per loop step, `num_splits` pieces of each sequence's context."""

    block_h: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: plan as for an H200, so tests see the GPU's cuts


def default_config(batch: int, queries: int, heads: int, page: int, max_tokens: int,
                   device: torch.device) -> DecodeConfig:
    """Rows per program: all heads up to 64 rows (one warpgroup's MMA tile), so each cache tile is read
    once per 64 (query, head) rows. Tile shapes and splits are those that measured best on an H200 at
    c=512, r=64, 64-token blocks (bench/mla_decode.py --sweep):
    - 16 rows: mma.sync, 32-token tiles, small enough (56 KB, 128 registers) for four programs per SM;
    - 32 rows: mma.sync, 64-token tiles, two in flight (num_stages 5 with the indirect table load), one
      program per SM;
    - 64 rows: wgmma, 64-token tiles, one program per SM.
    Splits: the fewest that minimise waves x work per program over those slots, each piece at least 256
    tokens long."""
    sq = triton.next_power_of_2(queries)
    block_h = max(min(triton.next_power_of_2(heads), max(64 // sq, 1)), max(16 // sq, 1))
    rows = sq * block_h
    programs = batch * -(-heads // block_h)
    slots = _num_sms(device) * (4 if rows <= 16 else 1)  # programs resident per SM
    most = max(1, min(64, max_tokens // 256))
    splits = min(range(1, most + 1), key=lambda k: (-(-programs * k // slots) / k, k))
    if rows <= 16:
        return DecodeConfig(block_h, 32, splits, num_warps=4, num_stages=2)
    if rows <= 32:
        return DecodeConfig(block_h, 64, splits, num_warps=8, num_stages=5)
    return DecodeConfig(block_h, 64, splits, num_warps=8, num_stages=2)


def _padded(dim: int) -> int:
    """Tile width for a latent or rope dim: a power of two (Triton's blocks) and at least 16 (an MMA's K);
    masked loads fill the padding with zeros, which add nothing to the dot products."""
    return max(16, triton.next_power_of_2(dim))


def _check(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, query_positions: torch.Tensor,
           kv_lora_rank: int) -> None:
    if q.dim() != 4 or cache.dim() != 3:
        raise ConfigError(f"paged MLA decode wants q [b, s, h, c + r] and cache [blocks, block_size, c + r], "
                          f"got q {tuple(q.shape)} and cache {tuple(cache.shape)}")
    b, s, _, width = q.shape
    c = kv_lora_rank
    if cache.shape[-1] != width or not 0 < c < width:
        raise ConfigError(f"q's last dim {width} and the cache's {cache.shape[-1]} must both be kv_lora_rank ({c}) "
                          f"+ the rope dim")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or tuple(query_positions.shape) != (b, s):
        raise ConfigError(f"block_tables must be [b={b}, max_blocks] and query_positions [b={b}, s={s}], got "
                          f"{tuple(block_tables.shape)} and {tuple(query_positions.shape)}")
    if q.dtype != cache.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"q ({q.dtype}) and cache ({cache.dtype}) must share one of bf16, fp16, fp32")
    if len({t.device for t in (q, cache, block_tables, query_positions)}) != 1:
        raise ConfigError("q, cache, block_tables and query_positions must be on one device")


def paged_mla_decode_triton(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                            query_positions: torch.Tensor, softmax_scale: float, kv_lora_rank: int,
                            num_splits: int | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """q [b, s, h, c + r], cache [num_blocks, block_size, c + r], block_tables [b, max_blocks] (int),
    query_positions [b, s] (key t visible to a query iff t <= its position; a sequence's context is its
    last query position + 1) -> latent [b, s, h, c] in q's dtype. `num_splits` overrides the heuristic's
    context split; `config` replaces the whole heuristic (benchmarks)."""
    _check(q, cache, block_tables, query_positions, kv_lora_rank)
    b, s, h, width = q.shape
    c, r = kv_lora_rank, width - kv_lora_rank
    page, max_blocks = cache.shape[1], block_tables.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if cache.stride(-1) != 1:
        raise ConfigError("the cache's last dim must be contiguous")
    cfg = config or default_config(b, s, h, page, max_blocks * page, q.device)
    if num_splits is not None:
        cfg = replace(cfg, num_splits=num_splits)
    if cfg.num_splits < 1:
        raise ConfigError(f"num_splits must be >= 1, got {cfg.num_splits}")
    out = torch.empty(b, s, h, c, device=q.device, dtype=q.dtype)
    if b == 0:
        return out
    split = cfg.num_splits > 1
    if split:
        part = torch.empty(b, s, h, cfg.num_splits, c, device=q.device, dtype=torch.float32)
        lse = torch.empty(b, s, h, cfg.num_splits, device=q.device, dtype=torch.float32)
        target, ostrides = part, part.stride()[:4]
    else:
        lse, target, ostrides = out, out, (*out.stride()[:3], 0)
    grid = (triton.cdiv(h, cfg.block_h), cfg.num_splits, b)
    _mla_decode_split[grid](
        q, cache, block_tables, query_positions, target, lse,
        softmax_scale * _LOG2E, h, cfg.num_splits, max_blocks * page,
        *q.stride()[:3], *cache.stride()[:2], *block_tables.stride(), *query_positions.stride(), *ostrides,
        S=s, C=c, R=r, PAGE=page, SQ=triton.next_power_of_2(s), BLOCK_H=cfg.block_h,
        BLOCK_C=_padded(c), BLOCK_R=_padded(r), BLOCK_N=cfg.block_n, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(q.device),
    )
    if split:
        rows = b * s * h
        splits = triton.next_power_of_2(cfg.num_splits)
        block_c = min(_padded(c), max(16, 4096 // (_COMBINE_ROWS * splits)))  # a tile of <= 4k fp32 values
        _mla_decode_combine[(triton.cdiv(rows, _COMBINE_ROWS), triton.cdiv(c, block_c))](
            part, lse, out, rows, cfg.num_splits, C=c, BLOCK_C=block_c, ROWS=_COMBINE_ROWS, SPLITS=splits,
            num_warps=4, **launch_options(q.device),
        )
    return out


__all__ = ["DecodeConfig", "default_config", "paged_mla_decode_triton"]
