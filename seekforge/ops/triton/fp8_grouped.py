"""The routed experts' grouped GEMMs of FP8 training, in Triton: e4m3 operands with DeepSeek-V3's blockwise scales,
fp32 accumulation, each 128-wide k step's product scaled as it joins the accumulator.

Rows are sorted by expert, `offsets` [experts] the cumulative ends of their segments (as torch._grouped_mm takes
them); an expert may have no rows, row counts are multiples of nothing, and n and k need not be multiples of 128
(partial tiles are masked).

- `fp8_grouped_mm`: out[rows of e] = a_e W_e^T (the forward; a in 1x128 tiles, W [experts, n, k] in 128x128 blocks),
  or with `transposed` a_e W_e (the input gradient; a [m, n] the output gradient in 1x128 tiles, W's same blocks read
  transposed, never a transposed copy). One program a (row block of one expert, column block); a row block never
  holds two experts' rows, and the grid's bound on them (rows / BLOCK_M + experts) needs no host synchronisation.
  BLOCK_K is the scale block, so each k step reads one scale a row of `a` and one of W: the step's product is
  scaled by their outer product (a column of BLOCK_N dividing 128 lies in one of W's blocks).
- `fp8_grouped_weight_gradient`: dW_e = dy_e^T x_e, contracting over the expert's rows in 128x1 tiles that never
  straddle two experts. Its operands are the transposes dy^T [n, rows] and x^T [k, rows] with each expert's rows
  in a segment of whole 128-row tiles, zero-padded (the caller lays them out: `seekforge.fp8.gemm`): the
  contracted rows innermost and every tile whole and aligned, so its loads are wide vectors (what Hopper's FP8
  MMA reads, with no mask along the rows), and 128x1 tiles of dy are 1x128 tiles of the padded transpose, their
  scales [n, rows / 128]. One program an (expert, n block, k block); each k step is one row tile, scaled by the
  outer product of the two tiles' column scales.

Each is one opaque op to torch.compile (`torch.library.custom_op`), so a compiled block keeps its graph whole and
fuses the quantisation around it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.quant import BLOCK, FP8, cdiv

SCALE_BLOCK = tl.constexpr(BLOCK)


@triton.jit
def _segments(offsets_ptr, num_experts, ROWS: tl.constexpr, E_BLOCK: tl.constexpr):
    """Per expert (vectors of E_BLOCK, empty past num_experts): its first row, its end, and the index of its first
    ROWS-row block where every expert's rows are cut into such blocks (its last one partial), expert by expert."""
    e = tl.arange(0, E_BLOCK)
    ends = tl.load(offsets_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e < num_experts), other=0).to(tl.int32)
    blocks = (ends - starts + ROWS - 1) // ROWS
    return e, starts, ends, tl.cumsum(blocks, 0) - blocks, blocks


@triton.jit
def _of(e, values, expert):
    """values[expert] of a per-expert vector (e: its indices)."""
    return tl.sum(tl.where(e == expert, values, 0), 0)


@triton.jit
def _grouped_mm(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, num_experts, N, K,
                stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bk, stride_bn,
                stride_bse, stride_bsk, stride_bsn, stride_cm, stride_cn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_BLOCK: tl.constexpr):
    """c[rows of e] = a[rows of e] @ B_e, B_e [K, N] element (k, n) at b_ptr + e stride_be + k stride_bk + n stride_bn
    (W_e^T or W_e by the strides), its scale at bs_ptr + e stride_bse + (k / 128) stride_bsk + (n / 128) stride_bsn;
    a's scale of row r, k step s at as_ptr + r stride_asm + s stride_ask."""
    tl.static_assert(BLOCK_K == SCALE_BLOCK)
    tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    block, n0 = tl.program_id(0) // n_blocks, (tl.program_id(0) % n_blocks) * BLOCK_N
    e, starts, ends, firsts, blocks = _segments(offsets_ptr, num_experts, BLOCK_M, E_BLOCK)
    expert = tl.sum((firsts + blocks <= block).to(tl.int32), 0)
    if expert >= num_experts:  # past the last real row block
        return
    first_row = _of(e, starts, expert) + (block - _of(e, firsts, expert)) * BLOCK_M
    rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < _of(e, ends, expert)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_at = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_at = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    as_at = as_ptr + rows * stride_asm
    bs_at = bs_ptr + expert * stride_bse + (n0 // SCALE_BLOCK) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - step * BLOCK_K
        a = tl.load(a_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale = tl.load(as_at + step * stride_ask, mask=row_ok, other=0.0)
        b_scale = tl.load(bs_at + step * stride_bsk)
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale)
        a_at += BLOCK_K * stride_ak
        b_at += BLOCK_K * stride_bk
    c_at = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_weight_gradient(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, N, K,
                             stride_an, stride_am, stride_asn, stride_ast, stride_bk, stride_bm, stride_bsk,
                             stride_bst, stride_ce, stride_cn, stride_ck,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[e] = A_e @ B_e^T over expert e's rows, whole 128-row tiles: a = dy^T [N, rows] (element (n, r) at
    a_ptr + n stride_an + r stride_am), its scale of column n, row tile t at as_ptr + n stride_asn + t stride_ast;
    b = x^T [K, rows] alike. Expert e's rows are offsets[e - 1] .. offsets[e], both multiples of 128."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    n0, k0 = (tl.program_id(0) // k_blocks) * BLOCK_N, (tl.program_id(0) % k_blocks) * BLOCK_K
    expert = tl.program_id(1)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + expert).to(tl.int32)
    cols_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_ok, k_ok = cols_n < N, cols_k < K
    a_at = a_ptr + cols_n[:, None] * stride_an
    b_at = b_ptr + cols_k[None, :] * stride_bk
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # whole tiles: no mask along the rows, so that the loads along them stay vectors
    for tile in range(start // SCALE_BLOCK, end // SCALE_BLOCK):
        rows = tile * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
        a = tl.load(a_at + rows[None, :] * stride_am, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_at + rows[:, None] * stride_bm, mask=k_ok[None, :], other=0.0)
        a_scale = tl.load(as_ptr + cols_n * stride_asn + tile * stride_ast, mask=n_ok, other=0.0)
        b_scale = tl.load(bs_ptr + cols_k * stride_bsk + tile * stride_bst, mask=k_ok, other=0.0)
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
    c_at = c_ptr + expert.to(tl.int64) * stride_ce + cols_n[:, None] * stride_cn + cols_k[None, :] * stride_ck
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128-row blocks where experts have rows enough to fill them (prefill and
# training: hundreds of rows an expert), 64 otherwise; BLOCK_K is the scale block. Up to 32 KB of operands a stage.
_WIDE, _NARROW = (128, 128, 8, 4), (64, 128, 4, 4)
_WEIGHT_GRADIENT = (128, 128, 8, 4)  # BLOCK_N, BLOCK_K (one tile of columns each), num_warps, num_stages


def default_tile(rows: int, experts: int) -> tuple[int, int, int, int]:
    """The forward's and input gradient's tile for `rows` rows over `experts` experts."""
    return _WIDE if rows >= 256 * max(experts, 1) else _NARROW


def _check(name: str, ok: bool, got: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {got}")


def _check_offsets(offsets: torch.Tensor, experts: int, device: torch.device) -> None:
    _check("FP8 grouped GEMM", offsets.shape == (experts,) and offsets.dtype in (torch.int32, torch.int64)
           and offsets.device == device,
           f"offsets must be [{experts}] int32 or int64 (one cumulative end an expert) on {device}, got "
           f"{tuple(offsets.shape)} {offsets.dtype} on {offsets.device}")


def fp8_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   offsets: torch.Tensor, out_dtype: torch.dtype, transposed: bool = False,
                   tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Rows of a [m, c] e4m3 (1x128 tile scales a_scale [m, ceil(c / 128)] fp32) sorted by expert, offsets [experts]
    their cumulative ends; w [experts, n, k] e4m3 with 128x128 block scales w_scale [experts, ceil(n / 128),
    ceil(k / 128)] fp32. -> [m, n] = a_e w_e^T (c = k), or with `transposed` [m, k] = a_e w_e (c = n), as out_dtype.
    tile: (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_N dividing 128; None: `default_tile`."""
    experts, n, k = w.shape if w.dim() == 3 else (0, 0, 0)
    inner, outer = (n, k) if transposed else (k, n)
    _check("FP8 grouped GEMM", a.dim() == 2 and w.dim() == 3 and a.shape[1] == inner and a.dtype == FP8
           and w.dtype == FP8 and a_scale.shape == (a.shape[0], cdiv(inner, BLOCK))
           and w_scale.shape == (experts, cdiv(n, BLOCK), cdiv(k, BLOCK))
           and a_scale.dtype == w_scale.dtype == torch.float32,
           f"wants a [m, {inner}] and w [experts, n, k] float8_e4m3fn with fp32 scales a [m, ceil({inner} / 128)] "
           f"and w [experts, ceil(n / 128), ceil(k / 128)]; got a {tuple(a.shape)} {a.dtype}, w {tuple(w.shape)} "
           f"{w.dtype}, scales {tuple(a_scale.shape)} {a_scale.dtype}, {tuple(w_scale.shape)} {w_scale.dtype}")
    _check_offsets(offsets, experts, a.device)
    tile = tile or default_tile(a.shape[0], experts)
    _check("FP8 grouped GEMM", BLOCK % tile[1] == 0, f"BLOCK_N must divide {BLOCK}, got tile {tile}")
    return launch_grouped_mm(a, a_scale, w, w_scale, offsets, out_dtype, transposed, list(tile), outer)


@torch.library.custom_op("seekforge::fp8_grouped_mm", mutates_args=())
def launch_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      offsets: torch.Tensor, out_dtype: torch.dtype, transposed: bool, tile: list[int],
                      outer: int) -> torch.Tensor:
    """`fp8_grouped_mm`'s launch, its arguments checked; outer: the output's columns."""
    m = a.shape[0]
    experts = w.shape[0]
    out = torch.empty(m, outer, device=a.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    block_m, block_n, warps, stages = tile
    # B_e [inner, outer]: W_e^T (the forward) or W_e itself (the input gradient), by strides alone
    sw, ss = w.stride(), w_scale.stride()
    b_strides = (sw[0], sw[1], sw[2]) if transposed else (sw[0], sw[2], sw[1])
    bs_strides = (ss[0], ss[1], ss[2]) if transposed else (ss[0], ss[2], ss[1])
    grid = ((triton.cdiv(m, block_m) + experts) * triton.cdiv(outer, block_n),)
    _grouped_mm[grid](a, a_scale, w, w_scale, out, offsets, experts, outer, a.shape[1], a.stride(0), a.stride(1),
                      a_scale.stride(0), a_scale.stride(1), *b_strides, *bs_strides, out.stride(0), out.stride(1),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, E_BLOCK=max(triton.next_power_of_2(experts), 2),
                      num_warps=warps, num_stages=stages)
    return out


@launch_grouped_mm.register_fake
def _(a, a_scale, w, w_scale, offsets, out_dtype, transposed, tile, outer) -> torch.Tensor:
    return a.new_empty(a.shape[0], outer, dtype=out_dtype)


def fp8_grouped_weight_gradient(dy_t: torch.Tensor, dy_scale: torch.Tensor, x_t: torch.Tensor, x_scale: torch.Tensor,
                                offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dW [experts, n, k] with dW_e = dy_e^T x_e over expert e's rows, as out_dtype. dy_t [n, rows] and x_t [k, rows]
    e4m3: the transposes of dy and x with each expert's rows in a segment of whole 128-row tiles (zero rows after its
    own), offsets [experts] the segments' ends (multiples of 128; not checked: that would read them on the host);
    their scales in 1x128 tiles of the transposes, dy_scale [n, rows / 128] and x_scale [k, rows / 128] fp32 (128x1
    tiles of dy and x, none straddling two experts)."""
    n, rows = dy_t.shape if dy_t.dim() == 2 else (0, -1)
    _check("FP8 grouped weight gradient", dy_t.dim() == x_t.dim() == 2 and x_t.shape[1] == rows
           and rows % BLOCK == 0 and dy_t.dtype == x_t.dtype == FP8 and dy_scale.shape == (n, rows // BLOCK)
           and x_scale.shape == (x_t.shape[0], rows // BLOCK) and dy_scale.dtype == x_scale.dtype == torch.float32,
           f"wants dy^T [n, rows] and x^T [k, rows] float8_e4m3fn, rows a multiple of {BLOCK}, with fp32 tile scales "
           f"[n, rows / {BLOCK}] and [k, rows / {BLOCK}]; got {tuple(dy_t.shape)} {dy_t.dtype}, {tuple(x_t.shape)} "
           f"{x_t.dtype}, scales {tuple(dy_scale.shape)} {dy_scale.dtype}, {tuple(x_scale.shape)} {x_scale.dtype}")
    _check_offsets(offsets, offsets.shape[0] if offsets.dim() == 1 else -1, dy_t.device)
    return launch_grouped_weight_gradient(dy_t, dy_scale, x_t, x_scale, offsets, out_dtype)


@torch.library.custom_op("seekforge::fp8_grouped_weight_gradient", mutates_args=())
def launch_grouped_weight_gradient(dy_t: torch.Tensor, dy_scale: torch.Tensor, x_t: torch.Tensor,
                                   x_scale: torch.Tensor, offsets: torch.Tensor,
                                   out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_grouped_weight_gradient`'s launch, its arguments checked."""
    experts, n, k = offsets.shape[0], dy_t.shape[0], x_t.shape[0]
    out = torch.empty(experts, n, k, device=dy_t.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    block_n, block_k, warps, stages = _WEIGHT_GRADIENT
    grid = (triton.cdiv(n, block_n) * triton.cdiv(k, block_k), experts)
    _grouped_weight_gradient[grid](
        dy_t, dy_scale, x_t, x_scale, out, offsets, n, k, dy_t.stride(0), dy_t.stride(1), dy_scale.stride(0),
        dy_scale.stride(1), x_t.stride(0), x_t.stride(1), x_scale.stride(0), x_scale.stride(1), out.stride(0),
        out.stride(1), out.stride(2), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


@launch_grouped_weight_gradient.register_fake
def _(dy_t, dy_scale, x_t, x_scale, offsets, out_dtype) -> torch.Tensor:
    return dy_t.new_empty(offsets.shape[0], dy_t.shape[0], x_t.shape[0], dtype=out_dtype)


__all__ = ["default_tile", "fp8_grouped_mm", "fp8_grouped_weight_gradient"]
