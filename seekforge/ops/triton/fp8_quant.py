"""FP8 training's quantisation (DeepSeek-V3's blockwise e4m3, `seekforge.ops.quant` holds the PyTorch references):
each op one pass over its input, reading every element once and writing e4m3 values and fp32 scales.

- `quantise_tiles`: 1x128 tiles along the rows of x [m, k] (the forward's and the input gradient's left operand).
- `quantise_segments`: for rows sorted into segments (experts; the dense layer is one segment), the 1x128 tiles of
  the rows and, from the same loaded 128x128 tile, the 128x1 tiles down the rows written transposed, each segment
  zero-padded to whole 128-row tiles: the weight gradient's operand (it contracts over rows), laid out as
  `seekforge.ops.triton.fp8_grouped`'s weight-gradient kernel and torch._scaled_mm read it. One program a
  (128-row tile of the padded layout, 128 columns). Several weights' output gradients go into one joined result,
  each written straight into its slice.
- `quantise_blocks`: 128x128 blocks of w [..., n, k]; with `transposed` the quantised transpose [..., k, n]
  (128x128 blocks are square: its scales are the transposed scale grid), which the input gradient dx = dy W
  reads with the contracted dimension innermost, as Hopper's FP8 MMA needs. Several weights of one input (a SwiGLU's
  w1 and w3) go into one buffer joined along n, each written straight into its slice, for one GEMM over all.

The rounding is the references': scale = amax / 448 (1 for a tile of zeros), value / scale correctly rounded
(div_rn: fp32 `/` compiles to an approximate division on NVIDIA GPUs), saturated, rounded to e4m3 to nearest,
ties to even; so the results are bit-exact against the references. Each launch is a torch.library custom op, so a
compiled block keeps its graph whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.quant import BLOCK, FP8, FP8_MAX, cdiv

SCALE_BLOCK = tl.constexpr(BLOCK)
E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _scale_of(amax):
    return tl.where(amax > 0, tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32)), 1.0)


@triton.jit
def _to_e4m3(x, scale):
    """x / scale saturated and rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic (the cast
    that follows is then exact: the rounding is the same whatever the cast's, the interpreter's included).

    The sign is x's sign bit, copied onto the rounded magnitude: a negative value that rounds to zero (or -0.0)
    gives e4m3 -0 as the reference's cast does. Negating instead would depend on how Triton lowers unary minus:
    up to triton-lang/triton#10270 it is `0 - x`, which turns -(+0.0) into +0.0."""
    y = tl.minimum(tl.abs(tl.div_rn(x, scale)), E4M3_MAX)
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp = tl.maximum(exponent - 3, -9)  # e4m3: 3 mantissa bits, subnormals below 2^-6 in steps of 2^-9
    big = ((ulp + 23 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(ulp + 23): its fp32 ulp is 2^ulp
    rounded = (y + big) - big  # fp32 addition rounds to a multiple of 2^ulp, ties to even
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def _quantise_tiles(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                    BLOCK_M: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(x), axis=1))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], _to_e4m3(x, scale[:, None]), mask=ok)
    tl.store(s_ptr + rows * stride_sm + tl.program_id(1), scale, mask=rows < M)


@triton.jit
def _quantise_segments(x_ptr, offsets_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, num_segments, K,
                       stride_xm, stride_xk, stride_qm, stride_sm, stride_qtk, stride_stk, E_BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr):
    tile, c0 = tl.program_id(0), tl.program_id(1) * SCALE_BLOCK
    # segment e's padded tiles: max(ceil(count / 128), 1), laid out one segment after the other
    e = tl.arange(0, E_BLOCK)
    ends = tl.load(offsets_ptr + e, mask=e < num_segments, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e < num_segments), other=0).to(tl.int32)
    tiles = tl.where(e < num_segments, tl.maximum((ends - starts + SCALE_BLOCK - 1) // SCALE_BLOCK, 1), 0)
    firsts = tl.cumsum(tiles, 0) - tiles
    seg = tl.sum((firsts + tiles <= tile).to(tl.int32), 0)  # num_segments: past the last segment (end 0, no rows)
    start = tl.sum(tl.where(e == seg, starts, 0), 0)
    end = tl.sum(tl.where(e == seg, ends, 0), 0)
    first = tl.sum(tl.where(e == seg, firsts, 0), 0)
    first_row = (start + (tile - first) * SCALE_BLOCK).to(tl.int64)
    r = tl.arange(0, CHUNK)
    cols = c0 + tl.arange(0, SCALE_BLOCK)
    col_ok = cols < K
    # The 128-row tile in chunks of CHUNK rows, twice: the rows' 1x128 tiles and the columns' amax, then the columns'
    # quantisation from the same rows read again (from cache). Holding all 128 rows at once spills registers.
    col_amax = tl.zeros([SCALE_BLOCK], dtype=tl.float32)
    for i in range(0, SCALE_BLOCK, CHUNK):
        rows = first_row + i + r
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        row_scale = _scale_of(tl.max(ax, axis=1))
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], _to_e4m3(x, row_scale[:, None]), mask=ok)
        tl.store(s_ptr + rows * stride_sm + tl.program_id(1), row_scale, mask=row_ok)
        col_amax = tl.maximum(col_amax, tl.max(ax, axis=0))  # the padding's zeros leave it as it is
    col_scale = _scale_of(col_amax)
    for i in range(0, SCALE_BLOCK, CHUNK):
        rows = first_row + i + r
        ok = (rows < end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        padded_rows = tile.to(tl.int64) * SCALE_BLOCK + i + r
        qt = tl.trans(_to_e4m3(x, col_scale[None, :]))  # [columns, rows]
        tl.store(qt_ptr + cols[:, None] * stride_qtk + padded_rows[None, :], qt, mask=col_ok[:, None])
    tl.store(st_ptr + cols * stride_stk + tile, col_scale, mask=col_ok)


@triton.jit
def _quantise_blocks(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_wk, stride_qe, stride_qr, stride_qc,
                     stride_se, stride_sr, stride_sc, TRANSPOSED: tl.constexpr):
    n_block, k_block, mat = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = n_block * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
    cols = k_block * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + mat * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=ok,
                other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.max(tl.abs(w), axis=1), axis=0))
    q = _to_e4m3(w, scale)
    if TRANSPOSED:
        tl.store(q_ptr + mat * stride_qe + cols[:, None] * stride_qr + rows[None, :] * stride_qc, tl.trans(q),
                 mask=tl.trans(ok))
        tl.store(s_ptr + mat * stride_se + k_block * stride_sr + n_block * stride_sc, scale)
    else:
        tl.store(q_ptr + mat * stride_qe + rows[:, None] * stride_qr + cols[None, :] * stride_qc, q, mask=ok)
        tl.store(s_ptr + mat * stride_se + n_block * stride_sr + k_block * stride_sc, scale)


_TILE_ROWS, _TILE_WARPS = 32, 4  # rows a program of `quantise_tiles`: 32 x 128 elements, 32 a thread
_SEGMENT_ROWS, _SEGMENT_WARPS = 32, 8  # rows `quantise_segments` holds at once: 32 x 128 elements, 16 a thread


def _check_input(name: str, x: torch.Tensor, dims: int) -> None:
    if x.dim() != dims or not x.is_floating_point() or x.dtype == FP8:
        raise ConfigError(f"{name}: wants a {dims}-d bf16, fp16 or fp32 tensor, got {tuple(x.shape)} {x.dtype}")


def quantise_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`seekforge.ops.quant.quantise_tiles` of a 2-d x [m, k]: (q [m, k] e4m3, scale [m, ceil(k / 128)] fp32)."""
    _check_input("FP8 tile quantisation", x, 2)
    return tuple(launch_quantise_tiles(x))


@torch.library.custom_op("seekforge::fp8_quantise_tiles", mutates_args=())
def launch_quantise_tiles(x: torch.Tensor) -> list[torch.Tensor]:
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    s = torch.empty(m, cdiv(k, BLOCK), device=x.device, dtype=torch.float32)
    if x.numel():
        _quantise_tiles[(cdiv(m, _TILE_ROWS), cdiv(k, BLOCK))](
            x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0), BLOCK_M=_TILE_ROWS,
            num_warps=_TILE_WARPS)
    return [q, s]


@launch_quantise_tiles.register_fake
def _(x):
    m, k = x.shape
    return [x.new_empty(m, k, dtype=FP8), x.new_empty(m, cdiv(k, BLOCK), dtype=torch.float32)]


def quantise_segments(x: torch.Tensor | Sequence[torch.Tensor], offsets: torch.Tensor,
                      padded_tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`seekforge.ops.quant.quantise_segments`' first four results: x [m, k] with rows in segments ending at offsets
    [segments] (int32 or int64) -> (q [m, k], scale [m, ceil(k / 128)], q_t [k, 128 padded_tiles], scale_t
    [k, padded_tiles]); padded_tiles: `seekforge.ops.quant.padded_tiles`' bound. Tiles past the last segment's
    hold zeros with scale 1. x a sequence of [m, k_i] (each k but the last a multiple of 128: the output gradients of
    weights joined along n): those of their join along k, each quantised straight into its slice."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    for part in parts:
        _check_input("FP8 segment quantisation", part, 2)
    if any(part.shape[0] != parts[0].shape[0] for part in parts) or any(p.shape[1] % BLOCK for p in parts[:-1]):
        raise ConfigError(f"FP8 segment quantisation: parts joined along k need one m and each k but the last a "
                          f"multiple of {BLOCK}, got {[tuple(part.shape) for part in parts]}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64) or offsets.device != parts[0].device:
        raise ConfigError(f"FP8 segment quantisation: offsets must be 1-d int32 or int64 on {parts[0].device}, got "
                          f"{tuple(offsets.shape)} {offsets.dtype} on {offsets.device}")
    return tuple(launch_quantise_segments(parts, offsets, padded_tiles))


def _segments_outputs(parts: list[torch.Tensor], padded_tiles: int, empty) -> list[torch.Tensor]:
    m, k = parts[0].shape[0], sum(part.shape[1] for part in parts)
    return [empty((m, k), FP8), empty((m, cdiv(k, BLOCK)), torch.float32), empty((k, padded_tiles * BLOCK), FP8),
            empty((k, padded_tiles), torch.float32)]


@torch.library.custom_op("seekforge::fp8_quantise_segments", mutates_args=())
def launch_quantise_segments(parts: list[torch.Tensor], offsets: torch.Tensor,
                             padded_tiles: int) -> list[torch.Tensor]:
    device = parts[0].device
    q, s, qt, st = _segments_outputs(parts, padded_tiles, lambda shape, dtype: torch.empty(shape, device=device,
                                                                                           dtype=dtype))
    at = 0
    for x in parts:
        k = x.shape[1]
        # its slice of the joined results: columns of q and s, rows of the transposed q_t and scale_t
        q_at, s_at, qt_at, st_at = q[:, at:at + k], s[:, at // BLOCK:], qt[at:at + k], st[at:at + k]
        if qt_at.numel():
            _quantise_segments[(padded_tiles, cdiv(k, BLOCK))](
                x, offsets, q_at, s_at, qt_at, st_at, offsets.shape[0], k, x.stride(0), x.stride(1), q_at.stride(0),
                s_at.stride(0), qt_at.stride(0), st_at.stride(0),
                E_BLOCK=max(triton.next_power_of_2(offsets.shape[0]), 2), CHUNK=_SEGMENT_ROWS, num_warps=_SEGMENT_WARPS)
        at += k
    return [q, s, qt, st]


@launch_quantise_segments.register_fake
def _(parts, offsets, padded_tiles):
    return _segments_outputs(parts, padded_tiles, lambda shape, dtype: parts[0].new_empty(shape, dtype=dtype))


def quantise_blocks(w: torch.Tensor | Sequence[torch.Tensor],
                    transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`seekforge.ops.quant.quantise_blocks` of w [n, k] or [experts, n, k]; with `transposed`, that of w's
    transpose ([..., k, n], contiguous), read from w as it is. w a sequence of weights of one shape but n (each n but
    the last a multiple of 128, so that no block straddles two): their blocks joined along n (along the last
    dimension with `transposed`), each weight quantised straight into its slice."""
    weights = [w] if isinstance(w, torch.Tensor) else list(w)
    lead = weights[0].shape[:-2] if weights and weights[0].dim() in (2, 3) else None
    if lead is None or any(v.dim() != weights[0].dim() or v.shape[:-2] != lead
                           or v.shape[-1] != weights[0].shape[-1] for v in weights):
        raise ConfigError(f"FP8 block quantisation: wants w [n, k] or [experts, n, k] (several: of one k and experts), "
                          f"got {[tuple(v.shape) for v in weights]}")
    if any(v.shape[-2] % BLOCK for v in weights[:-1]):
        raise ConfigError(f"FP8 block quantisation: weights joined along n need each n but the last a multiple of "
                          f"{BLOCK}, got {[v.shape[-2] for v in weights]}")
    for v in weights:
        _check_input("FP8 block quantisation", v, v.dim())
    q, s = launch_quantise_blocks([v.unsqueeze(0) if v.dim() == 2 else v for v in weights], transposed)
    return (q[0], s[0]) if not lead else (q, s)


def _joined_shapes(weights: list[torch.Tensor], transposed: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    e, k, n = weights[0].shape[0], weights[0].shape[2], sum(w.shape[1] for w in weights)
    rows, cols = (k, n) if transposed else (n, k)
    return (e, rows, cols), (e, cdiv(rows, BLOCK), cdiv(cols, BLOCK))


@torch.library.custom_op("seekforge::fp8_quantise_blocks", mutates_args=())
def launch_quantise_blocks(weights: list[torch.Tensor], transposed: bool) -> list[torch.Tensor]:
    q_shape, s_shape = _joined_shapes(weights, transposed)
    device = weights[0].device
    q = torch.empty(q_shape, device=device, dtype=FP8)
    s = torch.empty(s_shape, device=device, dtype=torch.float32)
    at = 0
    for w in weights:
        e, n, k = w.shape
        if w.numel():  # its slice of the joined blocks: along the rows, or along the columns of the transpose
            q_at = q[:, :, at:at + n] if transposed else q[:, at:at + n]
            s_at = s[:, :, at // BLOCK:] if transposed else s[:, at // BLOCK:]
            _quantise_blocks[(cdiv(n, BLOCK), cdiv(k, BLOCK), e)](
                w, q_at, s_at, n, k, *w.stride(), *q_at.stride(), *s_at.stride(), TRANSPOSED=transposed, num_warps=8)
        at += n
    return [q, s]


@launch_quantise_blocks.register_fake
def _(weights, transposed):
    q_shape, s_shape = _joined_shapes(weights, transposed)
    return [weights[0].new_empty(q_shape, dtype=FP8), weights[0].new_empty(s_shape, dtype=torch.float32)]


__all__ = ["quantise_blocks", "quantise_segments", "quantise_tiles"]
