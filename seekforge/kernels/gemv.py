"""y = x W^T for a few rows of x, in Triton: the dense projections of small decode steps (`gemv`), MLA's absorbed
per-head products (`head_gemv`), and two fused forms: a block's input norm with MLA's two input projections
(`norm_gemv`), and W_UK's product beside the rotated rope part of the query (`latent_query`), each one launch
where the compiled block ran three.

At one to four rows a projection only reads its weight, and cuBLAS's GEMM kernels for that case use too
few programs to keep the H200's memory busy: at the 16b shape's decode step wq [3072, 2048] took 6.5 us
(1.9 TB/s), wkv_a [576, 2048] 5.5 us (0.4 TB/s), wo [2048, 2048] 6.1 us (1.4 TB/s). Here each program
reads BLOCK_N whole weight rows, one BLOCK_K slice after another, for all the rows of x at once, so the grid
has thousands of programs with their loads in flight: 5.2, 2.4 and 4.6 us for the same three at one row, with
each shape's best tile (`bench/gemv.py --sweep`, weights cycled past L2). Not everywhere: cuBLAS reads the dense
MLP's [10944, 2048] at 78% of the bandwidth, and kept up at four rows where this kernel slowed.

No one tile is best: the sweep's winners range from (2 rows, 2048 wide, 4 warps) for wkv_a to (4, 256, 1) for
the dense MLP's [10944, 2048], and a tile chosen for one row lost to cuBLAS at four (each program then walks K
in more, latency-bound, slices). So on the GPU each shape (rows, N, K, weight layout) times a few candidate tiles
on its first call (`triton.autotune`, L2 flushed between runs), then the fastest beside cuBLAS, both replayed from
CUDA graphs as a captured step runs them, and keeps the faster of the two (`choice`), as torch.compile's
max-autotune weighs its templates against the library's GEMM.
The engine makes that first call while warming up, before any CUDA graph is captured (a shape first met inside a
capture runs the untimed tile). Under Triton's interpreter (CPU tests) the first candidate runs, untimed. The
fused forms tune their tile the same way; they have no library kernel to weigh against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.testing
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.kernels.latents import check_store, rotate_pairs, store_latent_row
from seekforge.kernels.pdl import launch_options, wait_for_inputs


@triton.jit
def _gemv_tile(x_ptr, w_ptr, y_ptr, b, pid_n, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn,
               stride_wk, stride_ym, stride_yb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PDL: tl.constexpr):
    """y[:, b, pid_n * BLOCK_N + (0 .. BLOCK_N)] = x[:, b] W[b]^T for those columns. The first weight slice is
    requested before waiting on the kernel that writes x (`seekforge.kernels.pdl`)."""
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
    _gemv_tile(x_ptr, w_ptr, y_ptr, tl.program_id(1), tl.program_id(0), M, N, K, stride_xm, stride_xb, stride_xk,
               stride_wb, stride_wn, stride_wk, stride_ym, stride_yb, BLOCK_M, BLOCK_N, BLOCK_K, PDL)


GEMV_ROWS = 4  # rows of x up to which one pass over the weight takes them all


@dataclass(frozen=True)
class GemvConfig:
    """Weight rows a program (BLOCK_N), the slice of K read at a time (BLOCK_K), warps a program."""
    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 2


# The tiles a shape's first call times: each one of the fastest in bench/gemv.py's sweep on the H200 for some
# shape of the 16b model at 1, 2 or 4 rows. The first of each list is what runs untimed (the interpreter).
K_CONTIGUOUS_TILES = [GemvConfig(2, 2048, 2), GemvConfig(2, 1024, 2), GemvConfig(2, 512, 1), GemvConfig(2, 256, 1),
                      GemvConfig(4, 256, 1), GemvConfig(2, 2048, 4), GemvConfig(4, 2048, 4), GemvConfig(4, 1024, 4),
                      GemvConfig(4, 512, 4)]
N_CONTIGUOUS_TILES = [GemvConfig(16, 64, 4), GemvConfig(16, 64, 1), GemvConfig(16, 64, 8), GemvConfig(32, 32, 2),
                      GemvConfig(16, 128, 4), GemvConfig(32, 64, 4)]


_INTERPRETED = triton.knobs.runtime.interpret  # read once: torch.compile cannot trace the lookup


def default_config(weight: torch.Tensor) -> GemvConfig:
    """The untimed tile for this weight's layout: whole rows of K-contiguous weights, a few a program (the
    projections); where N is the contiguous dim (MLA's W_UK applied to the query), column tiles that read whole
    lines."""
    return (K_CONTIGUOUS_TILES if weight.stride(-1) == 1 else N_CONTIGUOUS_TILES)[0]


def _fitting_tiles(configs, named_args, **kwargs):
    """The candidates of the weight's layout, no wider than the weight's K (N-contiguous: N) needs."""
    k_rows = named_args.get("stride_wk", 1) == 1
    tiles, seen = [], set()
    for cfg in K_CONTIGUOUS_TILES if k_rows else N_CONTIGUOUS_TILES:
        block_n, block_k = cfg.block_n, min(cfg.block_k, triton.next_power_of_2(named_args["K"]))
        if not k_rows:
            block_n = min(block_n, triton.next_power_of_2(named_args["N"]))
        if (block_n, block_k, cfg.num_warps) not in seen:
            seen.add((block_n, block_k, cfg.num_warps))
            tiles.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=cfg.num_warps))
    return tiles


def tuned(kernel, key: list[str], restore_value: tuple[str, ...] = ()):
    """`kernel` choosing BLOCK_N, BLOCK_K and warps among the fitting tiles on each key's first launch, each timed
    for ~20 ms with L2 flushed between runs: well under a second a shape, once per process. `restore_value` names
    the arguments a run accumulates into (atomic counts): each timed run gets them back as they were, so the
    launch that tunes counts once, as every later launch does."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps)
                 for c in K_CONTIGUOUS_TILES + N_CONTIGUOUS_TILES],
        key=key, prune_configs_by={"early_config_prune": _fitting_tiles}, restore_value=list(restore_value),
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
    )(kernel)


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
    if config is None and _INTERPRETED:
        config = default_config(weight)
    return launch_gemv(x, weight, None if config is None else tile_of(config, x.shape[2]))


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tile_of(config: GemvConfig, k: int) -> list[int]:
    return [config.block_n, min(config.block_k, triton.next_power_of_2(k)), config.num_warps]


def launch_tiled(kernel, tuned, grid, args: tuple, meta: dict, tile: list[int] | None, key: tuple,
                  untimed: list[int]) -> None:
    """Launch `kernel` with `tile` ([BLOCK_N, BLOCK_K, warps]), or for None `tuned`, its autotuned form, with the
    shape's tuned tile: timed on the shape's (`key`'s) first launch, except inside a graph being captured, where
    nothing may be timed and the `untimed` tile runs. grid(BLOCK_N) -> the launch grid."""
    if tile is None and key not in _TUNED:
        if capturing():
            tile = untimed
        else:
            _TUNED.add(key)
    meta = {**meta, **launch_options(args[0].device)}
    if tile is None:
        tuned[lambda m: grid(m["BLOCK_N"])](*args, **meta)
    else:
        block_n, block_k, num_warps = tile
        kernel[grid(block_n)](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)


_TUNED: set[tuple] = set()  # (kernel, shape) keys whose tile the autotuner has picked


# An opaque op to torch.compile, as the MoE and cache kernels are: a compiled decode block stays one graph.
@torch.library.custom_op("seekforge::gemv", mutates_args=())
def launch_gemv(x: torch.Tensor, weight: torch.Tensor, tile: list[int] | None) -> torch.Tensor:
    """x [M, B, K], weight [B, N, K], any strides -> y [M, B, N] with y[:, b] = x[:, b] weight[b]^T. tile:
    [BLOCK_N, BLOCK_K, warps]; None: the shape's tuned tile, or cuBLAS where that was faster (`choice`)."""
    if tile is not None:
        return _run(x, weight, tile)
    key = _shape_key(x, weight)
    if key not in _CHOICE and capturing():  # no timing inside a graph being captured
        return _run(x, weight, tile_of(default_config(weight), x.shape[2]))
    if key not in _CHOICE:  # the shape's first call: the tile tuned, then timed beside cuBLAS
        copies = weight_copies(weight)
        _CHOICE[key] = fastest({"triton": lambda: [_run(x, w, None) for w in copies],
                                "cublas": lambda: [_cublas(x, w) for w in copies]})
    return _run(x, weight, None) if _CHOICE[key] == "triton" else _cublas(x, weight)


def fastest(candidates: dict) -> str:
    """The name of the fastest of `candidates` (name -> a call of no arguments; the first listed wins a tie): each
    called once (which tunes its tiles), then timed replayed from a CUDA graph, as a captured step runs it. Timed
    call by call instead (`do_bench`, L2 flushed before each), the GEMV's choice went to cuBLAS at every shape of
    bench/gemv.py's run of 2026-11-29, also where the replayed Triton kernel was 1.4x faster (W_UV, one row)."""
    for run in candidates.values():
        run()
    us = {name: replayed_us(run) for name, run in candidates.items()}
    return min(us, key=us.get)


def replayed_us(run) -> float:
    return triton.testing.do_bench_cudagraph(run, rep=5) * 1e3


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and copies of it (same strides) that together pass twice the L2 cache, as a step's layers do: a
    call cycling through them finds no weight cached."""
    span = 1 + sum((n - 1) * stride for n, stride in zip(weight.shape, weight.stride()))
    l2 = torch.cuda.get_device_properties(weight.device).L2_cache_size
    copies = [weight]
    for _ in range(min(15, -(-2 * l2 // (span * weight.element_size())) - 1)):
        copies.append(weight.new_empty(span).as_strided(weight.shape, weight.stride()).copy_(weight))
    return copies


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


_CHOICE: dict[tuple, str] = {}  # shape key -> "triton" or "cublas", the faster on the shape's first call


def choice(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """What `gemv(x, weight)` (weight 2-D) or `head_gemv(x, weight)` (3-D) runs for this shape, "triton" or
    "cublas", once it has been called; None before."""
    if weight.dim() == 2:
        x, weight = x.reshape(-1, 1, x.shape[-1]), weight.unsqueeze(0)
    return _CHOICE.get(_shape_key(x, weight))


@triton.jit
def _normed_rows(x_ptr, g_ptr, w_ptr, y_ptr, M, N, K, eps, stride_xm, stride_wn, stride_ym, col0,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[:, col0 : col0 + BLOCK_N] = RMSNorm(x) W^T for one program, rounding as the model's RMSNorm does. (Requesting
    the first weight slice before the norm's statistics, and reading x's slice once, measured slower: 7.7 vs 7.2 us.)"""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    x_at = x_ptr + rows[:, None] * stride_xm
    wait_for_inputs(PDL)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # x is a few KB, read again from L2 below
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_at + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    rstd = tl.rsqrt(squares / K + eps)
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


_norm_gemv2_tuned = tuned(_norm_gemv2, ["M", "NA", "NB", "K"])  # weights with K contiguous


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
    ya, yb = launch_norm_gemv(x.reshape(rows, k), norm_weight, eps, wa, wb,
                              tile_of(default_config(wa), k) if _INTERPRETED else None)
    return ya.view(*lead, wa.shape[0]), yb.view(*lead, wb.shape[0])


@torch.library.custom_op("seekforge::norm_gemv", mutates_args=())
def launch_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wa: torch.Tensor, wb: torch.Tensor,
                     tile: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> (y_a [M, NA], y_b [M, NB]); tile as `launch_gemv` takes it (None: tuned)."""
    x = x.contiguous()  # a few KB: the kernel then needs one row stride
    m, k = x.shape
    ya, yb = x.new_empty(m, wa.shape[0]), x.new_empty(m, wb.shape[0])
    if m == 0 or k == 0:
        return ya.zero_(), yb.zero_()
    args = (x, norm_weight, wa, wb, ya, yb, m, wa.shape[0], wb.shape[0], k, eps, x.stride(0), wa.stride(0),
            wb.stride(0), ya.stride(0), yb.stride(0))
    launch_tiled(_norm_gemv2, _norm_gemv2_tuned,
                  lambda block_n: (triton.cdiv(wa.shape[0], block_n) + triton.cdiv(wb.shape[0], block_n),), args,
                  {"BLOCK_M": triton.next_power_of_2(m)}, tile,
                  ("norm_gemv", m, wa.shape[0], wb.shape[0], k, x.dtype, x.device), tile_of(default_config(wa), k))
    return ya, yb


@launch_norm_gemv.register_fake
def _(x, norm_weight, eps, wa, wb, tile):
    return x.new_empty(x.shape[0], wa.shape[0]), x.new_empty(x.shape[0], wb.shape[0])


@triton.jit
def _latent_query(x_ptr, w_ptr, y_ptr, pe_ptr, cos_ptr, sin_ptr, kv_ptr, g_ptr, slot_ptr, cache_ptr, eps, M, N, K, R,
                  C_KV, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn, stride_wk, stride_ym, stride_yb,
                  stride_pm, stride_pb, stride_angles, stride_kv, stride_map, stride_slot, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, STORE: tl.constexpr,
                  BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Per head b: y[:, b, :N] = x[:, b] W[b]^T (the GEMV's programs), y[:, b, N:N + R] = pe[:, b] rotated by
    cos/sin (one more program a head), adjacent pairs as `apply_rotary` turns them, in fp32. STORE: one more
    program a head puts the new tokens' latents (kv, C_KV + R wide) into their cache slots, as `store_new_latents`
    does, tokens b, b + heads, ... (work that does not wait for the query: one launch fewer in the chain)."""
    b, pid = tl.program_id(1), tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK_N)
    if pid < tiles:
        _gemv_tile(x_ptr, w_ptr, y_ptr, b, pid, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn,
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


def latent_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, store: tuple | None = None) -> torch.Tensor:
    """Absorbed MLA's latent query of a small decode step in one launch: q_nope [n, h, d] through W_UK
    (w_uk [h, c, d], any strides, as `head_gemv` takes it) beside q_pe [n, h, r] rotated by cos/sin [n, r / 2]
    (fp32) -> [n, h, c + r], i.e. torch.cat([head_gemv(q_nope, w_uk), apply_rotary(q_pe, cos, sin)], -1),
    without the rotation's and the concatenation's own kernels. n <= GEMV_ROWS. store: (cache, slot_mapping,
    kv_a, norm_weight, eps), the arguments of `seekforge.kernels.latents.store_new_latents` for the same n tokens
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
    tile = tile_of(default_config(w_uk), d) if _INTERPRETED else None
    cos, sin = cos.contiguous(), sin.contiguous()
    if store is None:
        return launch_latent_query(q_nope, q_pe, w_uk, cos, sin, tile)
    cache, slot_mapping, kv_a, norm_weight, eps = store
    check_store(cache, slot_mapping, kv_a)
    if kv_a.shape != (n, norm_weight.shape[0] + r):
        raise ConfigError(f"latent_query's store wants kv_a [n, c + r] = [{n}, {norm_weight.shape[0] + r}] for its "
                          f"{n} tokens and rotary width {r}; got {tuple(kv_a.shape)}")
    return launch_latent_query_storing(q_nope, q_pe, w_uk, cos, sin, cache, slot_mapping, kv_a.contiguous(),
                                       norm_weight, eps, tile)


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


# Writes the cache in place, as `store_new_latents` does: opaque to torch.compile, which never copies the cache.
@torch.library.custom_op("seekforge::latent_query_storing", mutates_args=("cache",))
def launch_latent_query_storing(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                                kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                tile: list[int] | None) -> torch.Tensor:
    return _launch_latent_query(q_nope, q_pe, w_uk, cos, sin, tile, (cache, slot_mapping, kv_a, norm_weight, eps))


@launch_latent_query_storing.register_fake
def _(q_nope, q_pe, w_uk, cos, sin, cache, slot_mapping, kv_a, norm_weight, eps, tile):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[1] + q_pe.shape[-1])


def last_tuned_tile() -> GemvConfig | None:
    """The tile the latest tuned launch ran (benchmarks report it)."""
    cfg = _gemv_tuned.best_config if hasattr(_gemv_tuned, "best_config") else None
    return None if cfg is None else GemvConfig(cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps)


@launch_gemv.register_fake
def _(x, weight, tile) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1])


__all__ = ["GEMV_ROWS", "K_CONTIGUOUS_TILES", "N_CONTIGUOUS_TILES", "GemvConfig", "choice", "default_config",
           "gemv", "head_gemv", "last_tuned_tile", "latent_query", "norm_gemv"]
