"""The routed experts' grouped GEMMs of FP8 training, in Triton: e4m3 operands with DeepSeek-V3's blockwise scales,
fp32 accumulation, each 128-wide k step's product scaled as it joins the accumulator.

Rows are sorted by expert, `offsets` [experts] the cumulative ends of their segments (as torch._grouped_mm takes
them); an expert may have no rows, row counts are multiples of nothing, and n and k need not be multiples of 128
(partial tiles are masked).

- `fp8_grouped_mm`: out[rows of e] = a_e W_e^T (a in 1x128 tiles, W [experts, n, k] in 128x128 blocks). The forward
  runs it on x and W, the input gradient dx = dy W_e on dy and W's quantised transpose [experts, k, n]
  (`seekforge.ops.triton.fp8_quant.quantise_blocks(w, transposed=True)`): both read their operands with the
  contracted dimension innermost, the layout Hopper's FP8 MMA (wgmma) takes for both operands. One program a (row
  block of one expert, column block); a row block never holds two experts' rows, and the grid's bound on them
  (rows / BLOCK_M + experts) needs no host synchronisation. BLOCK_K is the scale block, so each k step reads one
  scale a row of `a` and one a column of W (W's block scale of that column): the step's product is scaled by
  their outer product.
- `fp8_grouped_weight_gradient`: dW_e = dy_e^T x_e, contracting over the expert's rows in 128x1 tiles that never
  straddle two experts. Its operands are the transposes dy^T [n, rows] and x^T [k, rows] with each expert's rows
  in a segment of whole 128-row tiles, zero-padded (`seekforge.ops.triton.fp8_quant.quantise_segments`): the
  contracted rows innermost and every tile whole and aligned, so its loads are wide vectors (what Hopper's FP8
  MMA reads, with no mask along the rows), and 128x1 tiles of dy are 1x128 tiles of the padded transpose, their
  scales [n, rows / 128]. One program an (expert, n block, k block); each k step is one row tile, scaled by the
  outer product of the two tiles' column scales. dy may be several weights' outputs joined along n (a SwiGLU's w1
  and w3): then it writes each weight's gradient into its own tensor, as autograd hands it to the weight.

Both choose their tile (BLOCK_M or BLOCK_N, BLOCK_N or BLOCK_K, warps, pipeline stages) among a few candidates
timed on a shape's first launch (`triton.autotune`; under the interpreter the first runs, untimed). Each is one
opaque op to torch.compile (`torch.library.custom_op`), so a compiled block keeps its graph whole.
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
def _grouped_mm(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, num_experts, M, N, K,
                stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bn, stride_bk,
                stride_bse, stride_bsn, stride_bsk, stride_cm, stride_cn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_BLOCK: tl.constexpr):
    """c[rows of e] = a[rows of e] @ W_e^T, W_e [N, K] element (n, k) at b_ptr + e stride_be + n stride_bn
    + k stride_bk, its scale at bs_ptr + e stride_bse + (n / 128) stride_bsn + (k / 128) stride_bsk; a's scale of
    row r, k step s at as_ptr + r stride_asm + s stride_ask. M: a's rows rounded up to a power of 2 (the tiles'
    timing key, unused otherwise)."""
    tl.static_assert(BLOCK_K == SCALE_BLOCK)
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
    bs_at = bs_ptr + expert * stride_bse + (cols // SCALE_BLOCK) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - step * BLOCK_K
        a = tl.load(a_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale = tl.load(as_at + step * stride_ask, mask=row_ok, other=0.0)
        b_scale = tl.load(bs_at + step * stride_bsk, mask=col_ok, other=0.0)
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
        a_at += BLOCK_K * stride_ak
        b_at += BLOCK_K * stride_bk
    c_at = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_weight_gradient(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, N, K,
                             stride_an, stride_am, stride_asn, stride_ast, stride_bk, stride_bm, stride_bsk,
                             stride_bst, stride_ce, stride_cn, stride_ck, PART_N, stride_cp,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[e] = A_e @ B_e^T over expert e's rows, whole 128-row tiles: a = dy^T [N, rows] (element (n, r) at
    a_ptr + n stride_an + r stride_am), its scale of column n, row tile t at as_ptr + n stride_asn + t stride_ast;
    b = x^T [K, rows] alike. Expert e's rows are offsets[e - 1] .. offsets[e], both multiples of 128. c's n runs in
    parts of PART_N (weights joined along n), part p's at c_ptr + p stride_cp."""
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
    c_at = (c_ptr + expert.to(tl.int64) * stride_ce + (cols_n // PART_N)[:, None] * stride_cp
            + (cols_n % PART_N)[:, None] * stride_cn + cols_k[None, :] * stride_ck)
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# The candidate tiles, timed on a shape's first launch: (BLOCK_M, BLOCK_N, num_warps, num_stages) of `fp8_grouped_mm`
# (BLOCK_K is the scale block) and (BLOCK_N, BLOCK_K, num_warps, num_stages) of the weight gradient (each k step one
# 128-row tile). Hopper's FP8 wgmma wants 128- or 256-wide tiles; a stage holds (rows + columns) x 128 bytes, so 3 or 4
# stages of up to 48 KB fit the 227 KB of shared memory. 64-row blocks serve experts with few rows. Fewer stages (2-3
# of 32 KB) leave room for two or three programs an SM, so that one's epilogue overlaps another's loads: the weight
# gradient's loop is short (an expert's rows: 6 tiles at 16b's 8,192 tokens) and its fp32 tile store long.
GROUPED_TILES = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
                 (128, 128, 8, 3)]
WEIGHT_GRADIENT_TILES = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (128, 128, 4, 2),
                         (128, 128, 8, 2), (64, 128, 4, 2)]


def _first_when_interpreted(configs, named_args, **kwargs):
    """Under Triton's interpreter (no timing there) the first candidate; on a GPU all of them."""
    from seekforge.ops.dispatch import triton_interpreted

    return configs[:1] if triton_interpreted() else configs


def _configs(tiles, names):
    return [triton.Config(dict(zip(names, tile[:2])), num_warps=tile[2], num_stages=tile[3]) for tile in tiles]


_tuned_grouped_mm = triton.autotune(_configs(GROUPED_TILES, ("BLOCK_M", "BLOCK_N")), key=["M", "N", "K"],
                                    prune_configs_by={"early_config_prune": _first_when_interpreted})(_grouped_mm)
_tuned_weight_gradient = triton.autotune(
    _configs(WEIGHT_GRADIENT_TILES, ("BLOCK_N", "BLOCK_K")), key=["N", "K"],
    prune_configs_by={"early_config_prune": _first_when_interpreted})(_grouped_weight_gradient)


def _check(name: str, ok: bool, got: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {got}")


def _check_offsets(offsets: torch.Tensor, experts: int, device: torch.device) -> None:
    _check("FP8 grouped GEMM", offsets.shape == (experts,) and offsets.dtype in (torch.int32, torch.int64)
           and offsets.device == device,
           f"offsets must be [{experts}] int32 or int64 (one cumulative end an expert) on {device}, got "
           f"{tuple(offsets.shape)} {offsets.dtype} on {offsets.device}")


def fp8_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   offsets: torch.Tensor, out_dtype: torch.dtype,
                   tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Rows of a [m, k] e4m3 (1x128 tile scales a_scale [m, ceil(k / 128)] fp32) sorted by expert, offsets [experts]
    their cumulative ends; w [experts, n, k] e4m3 with 128x128 block scales w_scale [experts, ceil(n / 128),
    ceil(k / 128)] fp32. -> [m, n] = a_e w_e^T as out_dtype. The input gradient dy_e W_e passes W's quantised
    transpose as w. tile: (BLOCK_M, BLOCK_N, num_warps, num_stages), powers of 2 of at least 16; None: the fastest of
    GROUPED_TILES, timed on the shape's first launch."""
    experts, n, k = w.shape if w.dim() == 3 else (0, 0, 0)
    _check("FP8 grouped GEMM", a.dim() == 2 and w.dim() == 3 and a.shape[1] == k and a.dtype == FP8
           and w.dtype == FP8 and a_scale.shape == (a.shape[0], cdiv(k, BLOCK))
           and w_scale.shape == (experts, cdiv(n, BLOCK), cdiv(k, BLOCK))
           and a_scale.dtype == w_scale.dtype == torch.float32,
           f"wants a [m, k] and w [experts, n, k] float8_e4m3fn with fp32 scales a [m, ceil(k / 128)] "
           f"and w [experts, ceil(n / 128), ceil(k / 128)]; got a {tuple(a.shape)} {a.dtype}, w {tuple(w.shape)} "
           f"{w.dtype}, scales {tuple(a_scale.shape)} {a_scale.dtype}, {tuple(w_scale.shape)} {w_scale.dtype}")
    _check_offsets(offsets, experts, a.device)
    _check("FP8 grouped GEMM",
           tile is None or (len(tile) == 4 and all(t >= 16 and t & (t - 1) == 0 for t in tile[:2])),
           f"tile must be (BLOCK_M, BLOCK_N, num_warps, num_stages) with BLOCK_M and BLOCK_N powers of 2 of at least "
           f"16, got {tile}")
    return launch_grouped_mm(a, a_scale, w, w_scale, offsets, out_dtype, list(tile or ()))


@torch.library.custom_op("seekforge::fp8_grouped_mm", mutates_args=())
def launch_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      offsets: torch.Tensor, out_dtype: torch.dtype, tile: list[int]) -> torch.Tensor:
    """`fp8_grouped_mm`'s launch, its arguments checked; tile [] for the timed choice."""
    m, (experts, n, k) = a.shape[0], w.shape
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    # the timing key's rows rounded up to a power of 2: the engine's prefills vary m, and each m timed anew would
    # time every tile again (M is the key alone in the kernel)
    args = (a, a_scale, w, w_scale, out, offsets, experts, triton.next_power_of_2(m), n, k, a.stride(0), a.stride(1),
            a_scale.stride(0),
            a_scale.stride(1), *w.stride(), *w_scale.stride(), out.stride(0), out.stride(1))

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + experts) * triton.cdiv(n, meta["BLOCK_N"]),)

    e_block = max(triton.next_power_of_2(experts), 2)
    if tile:
        block_m, block_n, warps, stages = tile
        _grouped_mm[grid({"BLOCK_M": block_m, "BLOCK_N": block_n})](
            *args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, E_BLOCK=e_block, num_warps=warps,
            num_stages=stages)
    else:
        _tuned_grouped_mm[grid](*args, BLOCK_K=BLOCK, E_BLOCK=e_block)
    return out


@launch_grouped_mm.register_fake
def _(a, a_scale, w, w_scale, offsets, out_dtype, tile) -> torch.Tensor:
    return a.new_empty(a.shape[0], w.shape[1], dtype=out_dtype)


def fp8_grouped_weight_gradient(dy_t: torch.Tensor, dy_scale: torch.Tensor, x_t: torch.Tensor, x_scale: torch.Tensor,
                                offsets: torch.Tensor, out_dtype: torch.dtype, parts: int = 1) -> torch.Tensor:
    """dW [experts, n, k] with dW_e = dy_e^T x_e over expert e's rows, as out_dtype. dy_t [n, rows] and x_t [k, rows]
    e4m3: the transposes of dy and x with each expert's rows in a segment of whole 128-row tiles (zero rows after its
    own), offsets [experts] the segments' ends (multiples of 128; not checked: that would read them on the host);
    their scales in 1x128 tiles of the transposes, dy_scale [n, rows / 128] and x_scale [k, rows / 128] fp32 (128x1
    tiles of dy and x, none straddling two experts): `seekforge.ops.quant.quantise_segments`' layout. parts > 1: dy
    is that many weights' output gradients joined along n, each n / parts wide, and the result each weight's
    gradient on its own, [parts, experts, n / parts, k]."""
    n, rows = dy_t.shape if dy_t.dim() == 2 else (0, -1)
    _check("FP8 grouped weight gradient", dy_t.dim() == x_t.dim() == 2 and x_t.shape[1] == rows
           and rows % BLOCK == 0 and dy_t.dtype == x_t.dtype == FP8 and dy_scale.shape == (n, rows // BLOCK)
           and x_scale.shape == (x_t.shape[0], rows // BLOCK) and dy_scale.dtype == x_scale.dtype == torch.float32,
           f"wants dy^T [n, rows] and x^T [k, rows] float8_e4m3fn, rows a multiple of {BLOCK}, with fp32 tile scales "
           f"[n, rows / {BLOCK}] and [k, rows / {BLOCK}]; got {tuple(dy_t.shape)} {dy_t.dtype}, {tuple(x_t.shape)} "
           f"{x_t.dtype}, scales {tuple(dy_scale.shape)} {dy_scale.dtype}, {tuple(x_scale.shape)} {x_scale.dtype}")
    _check_offsets(offsets, offsets.shape[0] if offsets.dim() == 1 else -1, dy_t.device)
    _check("FP8 grouped weight gradient", parts >= 1 and n % parts == 0,
           f"parts must divide dy's {n} columns, got {parts}")
    out = launch_grouped_weight_gradient(dy_t, dy_scale, x_t, x_scale, offsets, out_dtype, parts)
    return out if parts > 1 else out[0]


@torch.library.custom_op("seekforge::fp8_grouped_weight_gradient", mutates_args=())
def launch_grouped_weight_gradient(dy_t: torch.Tensor, dy_scale: torch.Tensor, x_t: torch.Tensor,
                                   x_scale: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype,
                                   parts: int) -> torch.Tensor:
    """`fp8_grouped_weight_gradient`'s launch, its arguments checked: [parts, experts, n / parts, k]."""
    experts, n, k = offsets.shape[0], dy_t.shape[0], x_t.shape[0]
    out = torch.empty(parts, experts, n // parts, k, device=dy_t.device, dtype=out_dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), experts)

    _tuned_weight_gradient[grid](
        dy_t, dy_scale, x_t, x_scale, out, offsets, n, k, dy_t.stride(0), dy_t.stride(1), dy_scale.stride(0),
        dy_scale.stride(1), x_t.stride(0), x_t.stride(1), x_scale.stride(0), x_scale.stride(1), out.stride(1),
        out.stride(2), out.stride(3), n // parts, out.stride(0))
    return out


@launch_grouped_weight_gradient.register_fake
def _(dy_t, dy_scale, x_t, x_scale, offsets, out_dtype, parts) -> torch.Tensor:
    return dy_t.new_empty(parts, offsets.shape[0], dy_t.shape[0] // parts, x_t.shape[0], dtype=out_dtype)


__all__ = ["GROUPED_TILES", "WEIGHT_GRADIENT_TILES", "fp8_grouped_mm", "fp8_grouped_weight_gradient"]
