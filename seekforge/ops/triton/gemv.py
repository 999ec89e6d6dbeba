"""y = x W^T for a few rows of x, in Triton: the dense projections of small decode steps (`gemv`, and `fp8_gemv` for
e4m3 weights with 128x128 block scales), MLA's absorbed per-head products (`head_gemv`), and a block's input norm
with MLA's two input projections in one launch (`norm_gemv`, and `fp8_norm_gemv` for e4m3 weights).

At one to four rows a projection only reads its weight, and cuBLAS's GEMM kernels for that case use too few programs
to keep the GPU's memory busy. Here each program reads BLOCK_N whole weight rows, one BLOCK_K slice after another,
for all the rows of x at once, so the grid has thousands of programs with their loads in flight. Not everywhere:
cuBLAS reads some shapes (the dense MLP's) as fast, so each shape keeps the faster of its tuned tile and cuBLAS
(`seekforge.ops.triton.tuning`; `choice` says which). `norm_gemv` tunes its tile the same way; it has no library
kernel to weigh against.

e4m3 weights (`fp8_project`) are read in 8-byte chunks, each thread summing a chunk's products in fp32 before
multiplying that sum by the chunk's 128x128 block scale: one scale load and multiply per chunk, and the chunked
weight and x's 16-bit chunks (16 bytes) share one register layout. Their tiles are their own
(`tuning.FP8_TILES`: twice the weights a program of the 16-bit ones, for the same bytes in flight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.testing
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.triton.pdl import wait_for_inputs
from seekforge.ops.triton.tuning import GemvConfig, choose, chosen, current, default_config, launch_tiled, tile_of, tuned


@triton.jit
def gemv_tile(x_ptr, w_ptr, y_ptr, b, pid_n, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn,
              stride_wk, stride_ym, stride_yb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PDL: tl.constexpr):
    """y[:, b, pid_n * BLOCK_N + (0 .. BLOCK_N)] = x[:, b] W[b]^T for those columns. The first weight slice is
    requested before waiting on the kernel that writes x (`seekforge.ops.triton.pdl`)."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_at = x_ptr + b * stride_xb + rows[:, None] * stride_xm
    w_ptr += b * stride_wb
    w = weight_slice(w_ptr, cols, 0, N, K, stride_wn, stride_wk, BLOCK_K)
    wait_for_inputs(PDL)
    acc = _times_x(w, x_at, rows, 0, M, K, stride_xk, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _times_x(weight_slice(w_ptr, cols, k0, N, K, stride_wn, stride_wk, BLOCK_K), x_at, rows, k0, M, K,
                        stride_xk, BLOCK_K)
    tl.store(y_ptr + b * stride_yb + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _times_x(w, x_at, rows, k0, M, K, stride_xk, BLOCK_K: tl.constexpr):
    """x's rows (their starts x_at [BLOCK_M, 1]) over columns k0 .. k0 + BLOCK_K times the weight slice w
    [BLOCK_N, BLOCK_K]: [BLOCK_M, BLOCK_N] in fp32, each slice reduced at once (registers do not grow with M)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_at + ks[None, :] * stride_xk, mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn, stride_wk,
          stride_ym, stride_yb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr):
    gemv_tile(x_ptr, w_ptr, y_ptr, tl.program_id(1), tl.program_id(0), M, N, K, stride_xm, stride_xb, stride_xk,
              stride_wb, stride_wn, stride_wk, stride_ym, stride_yb, BLOCK_M, BLOCK_N, BLOCK_K, PDL)


GEMV_ROWS = 4  # rows of x up to which one pass over the weight takes them all


_gemv_tuned = tuned(_gemv, ["M", "N", "K", "stride_wb", "stride_wn", "stride_wk"])


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """x [..., K] with at most GEMV_ROWS rows in all, weight [N, K] of x's dtype -> x W^T [..., N], accumulated
    in fp32 (as F.linear without bias). `config` replaces the shape's tuned tile (benchmarks)."""
    *lead, k = x.shape
    rows = x.numel() // k if k else 0
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x.dtype or rows > GEMV_ROWS:
        raise ConfigError(f"gemv wants x [..., K] with at most {GEMV_ROWS} rows and weight [N, K] of x's dtype; got "
                          f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    return _launch(x.reshape(rows, 1, k), weight.unsqueeze(0), config).view(*lead, weight.shape[0])


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             config: GemvConfig | None = None) -> torch.Tensor:
    """x [..., K] with at most GEMV_ROWS rows of a 16-bit dtype, weight [N, K] float8_e4m3fn with one fp32 scale
    per 128x128 block, scale [ceil(N / 128), ceil(K / 128)] (DeepSeek's weight_scale_inv) -> x (weight * scale)^T
    [..., N] in x's dtype: products in fp32, each 128x128 block's sum times its scale, accumulated in fp32.
    `config` (benchmarks) replaces the shape's tuned tile; its block_n must divide 128 (a program's rows share one
    row of scales)."""
    *lead, k = x.shape
    rows = x.numel() // k if k else 0
    n = weight.shape[0] if weight.dim() == 2 else 0
    if (weight.dim() != 2 or weight.shape[1] != k or weight.dtype != torch.float8_e4m3fn or rows > GEMV_ROWS
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or scale.dtype != torch.float32
            or tuple(scale.shape) != (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))):
        raise ConfigError(f"fp8_gemv wants x [..., K] with at most {GEMV_ROWS} rows, weight [N, K] float8_e4m3fn "
                          f"and its fp32 scale [ceil(N/{FP8_BLOCK}), ceil(K/{FP8_BLOCK})]; got x {tuple(x.shape)} "
                          f"{x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, scale {tuple(scale.shape)} "
                          f"{scale.dtype}")
    if config is not None and (config.block_n < 1 or FP8_BLOCK % config.block_n):
        raise ConfigError(f"fp8_gemv's block_n must divide {FP8_BLOCK} (a program's rows in one scale block), got "
                          f"{config}")
    if rows == 0 or k == 0:
        return x.new_zeros(*lead, n)
    tile = None if config is None else tile_of(config, k)
    return launch_fp8_gemv(x.reshape(rows, k), weight, scale, tile).view(*lead, n)


FP8_BLOCK = 128  # rows and columns of the weight one scale covers (DeepSeek-V3's weight_block_size)
SCALE_BLOCK = tl.constexpr(FP8_BLOCK)  # the same, for the kernels


@triton.jit
def _fp8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    fp8_project(x_ptr, x_ptr, 1.0, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                tl.program_id(0) * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, False, PDL)


@triton.jit
def fp8_project(x_ptr, g_ptr, rstd, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, n0,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                PDL: tl.constexpr):
    """y[:, n0 .. n0 + BLOCK_N] = x (W * S)^T for an e4m3 weight W [N, K] (K contiguous) and its block scales S, for
    one program, whose rows lie in one 128-row block (BLOCK_N divides 128): each K slice of W read as e4m3 in 8-byte
    chunks (`fp8_slice`), each chunk's products summed, then multiplied by its block's scale (`fp8_times_row`). NORM:
    x's rows normalised first, as the model's RMSNorm does (rstd [BLOCK_M] each row's, g_ptr the norm's weight). The
    first slice is requested before waiting on the kernel that writes x (`seekforge.ops.triton.pdl`)."""
    tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
    cols = n0 + tl.arange(0, BLOCK_N)
    s_at = s_ptr + (n0 // SCALE_BLOCK) * stride_sn
    w = fp8_slice(w_ptr, cols, 0, N, K, stride_wn, BLOCK_K)
    wait_for_inputs(PDL)
    acc = _fp8_times_x(w, s_at, x_ptr, g_ptr, rstd, 0, M, K, stride_xm, BLOCK_M, BLOCK_K, NORM)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _fp8_times_x(fp8_slice(w_ptr, cols, k0, N, K, stride_wn, BLOCK_K), s_at, x_ptr, g_ptr, rstd, k0, M, K,
                            stride_xm, BLOCK_M, BLOCK_K, NORM)
    rows = tl.arange(0, BLOCK_M)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


FP8_CHUNK = tl.constexpr(8)  # a thread's run of K, summed before its scale: one 16-byte load of x


@triton.jit
def fp8_chunks(k0, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K as [1, BLOCK_K / CHUNK, CHUNK], CHUNK = min(BLOCK_K, 8): each chunk within one
    128-column scale block (slices start at multiples of BLOCK_K, a power of two)."""
    CHUNK: tl.constexpr = min(BLOCK_K, FP8_CHUNK)
    return k0 + tl.arange(0, BLOCK_K // CHUNK)[None, :, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]


@triton.jit
def fp8_slice(w_at, cols, k0, N, K, stride_wn, BLOCK_K: tl.constexpr):
    """`weight_slice` of an e4m3 weight (K contiguous) as [BLOCK_N, BLOCK_K / CHUNK, CHUNK] (`fp8_chunks`), still
    e4m3: x's 16-bit rows chunked alike load in the same layout (no conversion between the two)."""
    ks = fp8_chunks(k0, BLOCK_K)
    return tl.load(w_at + cols[:, None, None] * stride_wn + ks, mask=(cols[:, None, None] < N) & (ks < K), other=0.0)


@triton.jit
def fp8_chunk_scales(s_at, k0, K, BLOCK_K: tl.constexpr):
    """The block scale of each chunk of an `fp8_slice` whose rows lie in one 128-row block, s_at that block's row of
    scales: [BLOCK_K / CHUNK] fp32, 0 past K."""
    CHUNK: tl.constexpr = min(BLOCK_K, FP8_CHUNK)
    starts = k0 + tl.arange(0, BLOCK_K // CHUNK) * CHUNK
    return tl.load(s_at + starts // SCALE_BLOCK, mask=starts < K, other=0.0)


@triton.jit
def fp8_times_row(w, scale, x):
    """An `fp8_slice` w [BLOCK_N, C, CHUNK] times one row of x chunked alike, [1, C, CHUNK] fp32, with the chunks'
    scales [C]: [BLOCK_N] fp32. Each chunk's products are summed in the thread that loaded it, and only that sum is
    multiplied by its scale."""
    return tl.sum(tl.sum(w.to(tl.float32) * x, axis=2) * scale[None, :], axis=1)


@triton.jit
def _fp8_times_x(w, s_at, x_ptr, g_ptr, rstd, k0, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr):
    """x's M rows over the slice's columns (NORM: normalised, as `fp8_project` says) times an `fp8_slice` w:
    [BLOCK_M, BLOCK_N] fp32, a row at a time (the product stays in the weight's layout)."""
    scale = fp8_chunk_scales(s_at, k0, K, BLOCK_K)
    ks = fp8_chunks(k0, BLOCK_K)
    rows = tl.arange(0, BLOCK_M)
    if NORM:
        g = tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, w.shape[0]), tl.float32)
    for m in tl.static_range(BLOCK_M):
        row_ok = tl.full(ks.shape, m, tl.int32) < M
        x = tl.load(x_ptr + m * stride_xm + ks, mask=(ks < K) & row_ok, other=0.0)
        if NORM:  # rounded where the model's RMSNorm rounds: after the scaling, and after the weight
            xn = (x.to(tl.float32) * tl.sum(tl.where(rows == m, rstd, 0.0), axis=0)).to(x.dtype)
            x = (xn.to(tl.float32) * g).to(x.dtype)
        acc += tl.where(rows[:, None] == m, fp8_times_row(w, scale, x.to(tl.float32))[None, :], 0.0)
    return acc


_fp8_gemv_tuned = tuned(_fp8_gemv, ["M", "N", "K"])


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dimension is contiguous (the e4m3 kernels take a row stride: an FP8 weight and its
    scales, views of their padded storage, are read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


# One opaque op, as `launch_gemv`: a compiled decode block keeps it in its graph.
@torch.library.custom_op("seekforge::fp8_gemv", mutates_args=())
def launch_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    tile: list[int] | None) -> torch.Tensor:
    """x [M, K], weight [N, K] e4m3, scale [N/128, K/128] fp32 (both rounded up) -> y [M, N] in x's dtype; tile as
    `launch_gemv` takes it (None: the shape's tuned tile)."""
    x, weight, scale = x.contiguous(), row_major(weight), row_major(scale)  # x is a few KB
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(m, n)
    args = (x, weight, scale, y, m, n, k, x.stride(0), weight.stride(0), scale.stride(0), y.stride(0))
    launch_tiled(_fp8_gemv, _fp8_gemv_tuned, lambda block_n: (triton.cdiv(n, block_n),), args,
                 {"BLOCK_M": triton.next_power_of_2(m)}, tile,
                 ("fp8_gemv", m, n, k, x.dtype, x.device), tile_of(default_config(weight), k))
    return y


@launch_fp8_gemv.register_fake
def _(x, weight, scale, tile) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def head_gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """Per head: x [n, h, K] with n <= GEMV_ROWS, weight [h, N, K] of x's dtype, any strides -> [n, h, N],
    torch.einsum("nhk,hjk->nhj", x, weight) (MLA's absorbed products of a small decode step)."""
    if (x.dim() != 3 or weight.dim() != 3 or x.shape[0] > GEMV_ROWS or weight.shape[0] != x.shape[1]
            or weight.shape[2] != x.shape[2] or weight.dtype != x.dtype):
        raise ConfigError(f"head_gemv wants x [n <= {GEMV_ROWS}, h, K] and weight [h, N, K] of x's dtype; got "
                          f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    return _launch(x, weight, config)


def _launch(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None) -> torch.Tensor:
    if x.numel() == 0 or weight.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[1], weight.shape[1])
    return launch_gemv(x, weight, None if config is None else tile_of(config, x.shape[2]))



# An opaque op to torch.compile, as the MoE and cache kernels are: a compiled decode block stays one graph.
@torch.library.custom_op("seekforge::gemv", mutates_args=())
def launch_gemv(x: torch.Tensor, weight: torch.Tensor, tile: list[int] | None) -> torch.Tensor:
    """x [M, B, K], weight [B, N, K], any strides -> y [M, B, N] with y[:, b] = x[:, b] weight[b]^T. tile:
    [BLOCK_N, BLOCK_K, warps]; None: the shape's tuned tile, or cuBLAS where that was faster (`choice`)."""
    if tile is not None:
        return _run(x, weight, tile)

    def candidates() -> dict:  # the shape's first call: the tile tuned, then timed beside cuBLAS
        copies = current().copies(weight)
        return {"triton": lambda: [_run(x, w, None) for w in copies],
                "cublas": lambda: [_cublas(x, w) for w in copies]}

    picked = choose("gemv", _shape_key(x, weight), candidates, untimed="untimed")
    if picked == "untimed":
        return _run(x, weight, tile_of(default_config(weight), x.shape[2]))
    return _run(x, weight, None) if picked == "triton" else _cublas(x, weight)


def _run(x: torch.Tensor, weight: torch.Tensor, tile: list[int] | None) -> torch.Tensor:
    m, batch, k = x.shape
    n = weight.shape[1]
    y = x.new_empty(m, batch, n)
    args = (x, weight, y, m, n, k, x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
            weight.stride(2), y.stride(0), y.stride(1))
    launch_tiled(_gemv, _gemv_tuned, lambda block_n: (triton.cdiv(n, block_n), batch), args,
                  {"BLOCK_M": triton.next_power_of_2(m)}, tile, ("gemv", *_shape_key(x, weight)),
                  tile_of(default_config(weight), k))
    return y


def _cublas(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the model runs without this kernel: F.linear for one weight, the per-head einsum for a batch; laid out
    as the op's fake says (contiguous), which the compiled graph around it asserts."""
    if weight.shape[0] == 1:
        return F.linear(x[:, 0], weight[0]).unsqueeze(1)
    return torch.einsum("mbk,bnk->mbn", x, weight).contiguous()  # the batched GEMM writes [B, M, N]


def _shape_key(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (*x.shape, *weight.shape[1:], x.dtype, *weight.stride(), x.device)


def choice(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """What `gemv(x, weight)` (weight 2-D) or `head_gemv(x, weight)` (3-D) runs for this shape, "triton" or
    "cublas", once it has been called; None before."""
    if weight.dim() == 2:
        x, weight = x.reshape(-1, 1, x.shape[-1]), weight.unsqueeze(0)
    return chosen("gemv", _shape_key(x, weight))


@triton.jit
def _normed_rows(x_ptr, g_ptr, w_ptr, y_ptr, M, N, K, eps, stride_xm, stride_wn, stride_ym, col0,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[:, col0 : col0 + BLOCK_N] = RMSNorm(x) W^T for one program, rounding as the model's RMSNorm does. (Requesting
    the first weight slice before the norm's statistics, and reading x's slice once, measured slower.)"""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    x_at = x_ptr + rows[:, None] * stride_xm
    wait_for_inputs(PDL)
    rstd = _rstd(x_ptr, M, K, eps, stride_xm, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_at + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
        xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        xn = (xn.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype).to(tl.float32)
        w = weight_slice(w_ptr, cols, k0, N, K, stride_wn, 1, BLOCK_K)
        acc += tl.sum(xn[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _rstd(x_ptr, M, K, eps, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of each of x's rows [M, K] (plus eps inside the root), [BLOCK_M] fp32, as the model's RMSNorm."""
    rows = tl.arange(0, BLOCK_M)
    x_at = x_ptr + rows[:, None] * stride_xm
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # x is a few KB, read again from L2 after
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_at + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    return tl.rsqrt(squares / K + eps)


@triton.jit
def weight_slice(w_ptr, cols, k0, N, K, stride_wn, stride_wk, BLOCK_K: tl.constexpr):
    """Rows `cols` (of N) of a weight [N, K], columns k0 .. k0 + BLOCK_K; zeros past its edges."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                   mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)


@triton.jit
def _norm_gemv2(x_ptr, g_ptr, wa_ptr, wb_ptr, ya_ptr, yb_ptr, M, NA, NB, K, eps, stride_xm, stride_wa, stride_wb,
                stride_ya, stride_yb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PDL: tl.constexpr):
    """The programs of both weights in one grid: the first cdiv(NA, BLOCK_N) take wa's rows, the rest wb's."""
    pid = tl.program_id(0)
    programs_a = tl.cdiv(NA, BLOCK_N)
    if pid < programs_a:
        _normed_rows(x_ptr, g_ptr, wa_ptr, ya_ptr, M, NA, K, eps, stride_xm, stride_wa, stride_ya, pid * BLOCK_N,
                     BLOCK_M, BLOCK_N, BLOCK_K, PDL)
    else:
        _normed_rows(x_ptr, g_ptr, wb_ptr, yb_ptr, M, NB, K, eps, stride_xm, stride_wb, stride_yb,
                     (pid - programs_a) * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, PDL)


_norm_gemv2_tuned = tuned(_norm_gemv2, ["M", "NA", "NB", "K"], weight="wa_ptr")  # weights with K contiguous


def norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wa: torch.Tensor,
              wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] with at most GEMV_ROWS rows -> (RMSNorm(x) wa^T, RMSNorm(x) wb^T), RMSNorm as
    `seekforge.model.norm.RMSNorm` computes it (weight norm_weight, eps): a block's input norm and the two
    projections that read its output (MLA's wq or wq_a, and wkv_a) in one launch, which reads x and the two
    weights once. Weights [N, K] with K contiguous, all of x's dtype."""
    *lead, k = x.shape
    rows = x.numel() // k if k else 0
    if (rows > GEMV_ROWS or norm_weight.shape != (k,) or any(w.dim() != 2 or w.shape[1] != k or w.stride(1) != 1
                                                               for w in (wa, wb))
            or len({x.dtype, norm_weight.dtype, wa.dtype, wb.dtype}) != 1):
        raise ConfigError(f"norm_gemv wants x [..., K] with at most {GEMV_ROWS} rows, norm_weight [K] and weights "
                          f"[N, K] (K contiguous), all of one dtype; got x {tuple(x.shape)} {x.dtype}, norm_weight "
                          f"{tuple(norm_weight.shape)} {norm_weight.dtype}, weights {tuple(wa.shape)} {wa.dtype} and "
                          f"{tuple(wb.shape)} {wb.dtype}")
    ya, yb = launch_norm_gemv(x.reshape(rows, k), norm_weight, eps, wa, wb, None)
    return ya.view(*lead, wa.shape[0]), yb.view(*lead, wb.shape[0])


@torch.library.custom_op("seekforge::norm_gemv", mutates_args=())
def launch_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wa: torch.Tensor, wb: torch.Tensor,
                     tile: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> (y_a [M, NA], y_b [M, NB]); tile as `launch_gemv` takes it (None: tuned)."""
    x = x.contiguous()  # a few KB: the kernel then needs one row stride
    return _launch_norm_gemv2(_norm_gemv2, _norm_gemv2_tuned, "norm_gemv", x, norm_weight, eps, (wa, wb), tile)


@launch_norm_gemv.register_fake
def _(x, norm_weight, eps, wa, wb, tile):
    return x.new_empty(x.shape[0], wa.shape[0]), x.new_empty(x.shape[0], wb.shape[0])


@triton.jit
def _fp8_norm_gemv2(x_ptr, g_ptr, wa_ptr, wb_ptr, sa_ptr, sb_ptr, ya_ptr, yb_ptr, M, NA, NB, K, eps, stride_xm,
                    stride_wa, stride_wb, stride_sa, stride_sb, stride_ya, stride_yb, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """`_norm_gemv2` over e4m3 weights with their block scales: the first cdiv(NA, BLOCK_N) programs take wa's rows,
    the rest wb's, each normalising x's rows itself and reading its weight rows as `fp8_project` does."""
    pid = tl.program_id(0)
    programs_a = tl.cdiv(NA, BLOCK_N)
    wait_for_inputs(PDL)
    rstd = _rstd(x_ptr, M, K, eps, stride_xm, BLOCK_M, BLOCK_K)
    if pid < programs_a:
        fp8_project(x_ptr, g_ptr, rstd, wa_ptr, sa_ptr, ya_ptr, M, NA, K, stride_xm, stride_wa, stride_sa, stride_ya,
                    pid * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, True, False)
    else:
        fp8_project(x_ptr, g_ptr, rstd, wb_ptr, sb_ptr, yb_ptr, M, NB, K, stride_xm, stride_wb, stride_sb, stride_yb,
                    (pid - programs_a) * BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K, True, False)


_fp8_norm_gemv2_tuned = tuned(_fp8_norm_gemv2, ["M", "NA", "NB", "K"], weight="wa_ptr")


def fp8_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wa: torch.Tensor, sa: torch.Tensor,
                  wb: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_gemv` over FP8 weights: x [..., K] with at most GEMV_ROWS rows of a 16-bit dtype, norm_weight [K] of
    x's dtype, wa and wb [N, K] float8_e4m3fn with their fp32 block scales sa and sb (as `fp8_gemv` takes them) ->
    (RMSNorm(x) (wa * sa)^T, RMSNorm(x) (wb * sb)^T) in x's dtype: a block's input norm and MLA's two input
    projections in one launch, where unfused they are the norm's kernels and two FP8 GEMVs."""
    *lead, k = x.shape
    rows = x.numel() // k if k else 0
    if (rows > GEMV_ROWS or norm_weight.shape != (k,) or x.dtype not in (torch.bfloat16, torch.float16)
            or norm_weight.dtype != x.dtype
            or any(w.dim() != 2 or w.shape[1] != k or w.dtype != torch.float8_e4m3fn or s.dtype != torch.float32
                   or tuple(s.shape) != (triton.cdiv(w.shape[0], FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))
                   for w, s in ((wa, sa), (wb, sb)))):
        raise ConfigError(f"fp8_norm_gemv wants x [..., K] with at most {GEMV_ROWS} rows of a 16-bit dtype, "
                          f"norm_weight [K] of x's dtype, weights [N, K] float8_e4m3fn with fp32 scales "
                          f"[ceil(N/{FP8_BLOCK}), ceil(K/{FP8_BLOCK})]; got x {tuple(x.shape)} {x.dtype}, norm_weight "
                          f"{tuple(norm_weight.shape)} {norm_weight.dtype}, weights {tuple(wa.shape)} {wa.dtype} and "
                          f"{tuple(wb.shape)} {wb.dtype}, scales {tuple(sa.shape)} {sa.dtype} and {tuple(sb.shape)} "
                          f"{sb.dtype}")
    ya, yb = launch_fp8_norm_gemv(x.reshape(rows, k), norm_weight, eps, wa, sa, wb, sb)
    return ya.view(*lead, wa.shape[0]), yb.view(*lead, wb.shape[0])


@torch.library.custom_op("seekforge::fp8_norm_gemv", mutates_args=())
def launch_fp8_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wa: torch.Tensor, sa: torch.Tensor,
                         wb: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y_a [M, NA], y_b [M, NB]) in the shape's tuned tile."""
    x, wa, wb, sa, sb = x.contiguous(), row_major(wa), row_major(wb), row_major(sa), row_major(sb)
    return _launch_norm_gemv2(_fp8_norm_gemv2, _fp8_norm_gemv2_tuned, "fp8_norm_gemv", x, norm_weight, eps,
                              (wa, wb, sa, sb), None)


@launch_fp8_norm_gemv.register_fake
def _(x, norm_weight, eps, wa, sa, wb, sb):
    return x.new_empty(x.shape[0], wa.shape[0]), x.new_empty(x.shape[0], wb.shape[0])


def _launch_norm_gemv2(kernel, tuned_kernel, name: str, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       mats: tuple[torch.Tensor, ...], tile: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y_a [M, NA], y_b [M, NB]) by a two-output norm-GEMV kernel, whose matrix arguments are `mats`:
    wa [NA, K] and wb [NB, K], then any scales, each passed with its row stride; one grid covers both outputs."""
    wa, wb = mats[:2]
    m, k = x.shape
    ya, yb = x.new_empty(m, wa.shape[0]), x.new_empty(m, wb.shape[0])
    if m == 0 or k == 0:
        return ya.zero_(), yb.zero_()
    args = (x, norm_weight, *mats, ya, yb, m, wa.shape[0], wb.shape[0], k, eps, x.stride(0),
            *(t.stride(0) for t in mats), ya.stride(0), yb.stride(0))
    launch_tiled(kernel, tuned_kernel,
                 lambda block_n: (triton.cdiv(wa.shape[0], block_n) + triton.cdiv(wb.shape[0], block_n),), args,
                 {"BLOCK_M": triton.next_power_of_2(m)}, tile,
                 (name, m, wa.shape[0], wb.shape[0], k, x.dtype, x.device), tile_of(default_config(wa), k))
    return ya, yb


def last_tuned_tile(fp8: bool = False) -> GemvConfig | None:
    """The tile the latest tuned launch of `gemv` (fp8: of `fp8_gemv`) ran (benchmarks report it)."""
    tuner = _fp8_gemv_tuned if fp8 else _gemv_tuned
    cfg = tuner.best_config if hasattr(tuner, "best_config") else None
    return None if cfg is None else GemvConfig(cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps)


@launch_gemv.register_fake
def _(x, weight, tile) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1])


__all__ = ["FP8_BLOCK", "GEMV_ROWS", "choice", "fp8_gemv", "fp8_norm_gemv", "gemv", "gemv_tile", "head_gemv",
           "last_tuned_tile", "norm_gemv", "row_major", "weight_slice"]
