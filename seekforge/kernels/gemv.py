"""y = x W^T for a few rows of x, in Triton: the dense projections of small decode steps, and MLA's absorbed
per-head products (`head_gemv`).

At one to four rows a projection only reads its weight, and cuBLAS's GEMM kernels for that case use too
few programs to keep the H200's memory busy: at the 16b shape's decode step wq [3072, 2048] took 6.5 us
(1.9 TB/s), wkv_a [576, 2048] 5.5 us (0.4 TB/s), wo [2048, 2048] 6.1 us (1.4 TB/s). Here each program
reads BLOCK_N whole weight rows, one BLOCK_K slice after another, for all the rows of x at once, so the grid
has thousands of programs with their loads in flight: 5.4, 2.5 and 4.7 us for the same three, measured with
a one-row form of this kernel in a first tile sweep (weights cycled past L2); `bench/gemv.py` times this one
against cuBLAS and sweeps its tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_xb, stride_xk, stride_wb, stride_wn, stride_wk,
          stride_ym, stride_yb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_at = x_ptr + b * stride_xb + rows[:, None] * stride_xm
    w_at = w_ptr + b * stride_wb + cols[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)  # reduced once at the end: no sum per slice
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_at + ks[None, :] * stride_wk, mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        x = tl.load(x_at + ks[None, :] * stride_xk, mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + b * stride_yb + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


GEMV_ROWS = 4  # rows of x up to which one pass over the weight takes them all


@dataclass(frozen=True)
class GemvConfig:
    """Weight rows a program (BLOCK_N), the slice of K read at a time (BLOCK_K), warps a program."""
    block_n: int = 2
    block_k: int = 512
    num_warps: int = 2


def default_config(weight: torch.Tensor) -> GemvConfig:
    """Whole rows of K-contiguous weights, a few a program (the projections); where N is the contiguous dim
    (MLA's W_UK applied to the query), column tiles wide enough that each load reads whole lines and narrow
    enough for two programs an SM at the 16b shape (16 heads x 512 / 32): a guess until bench/gemv.py sweeps it."""
    return GemvConfig() if weight.stride(-1) == 1 else GemvConfig(32, 32, 2)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """x [..., K] with at most GEMV_ROWS rows in all, weight [N, K] of x's dtype -> x W^T [..., N], accumulated
    in fp32 (as F.linear without bias). `config` replaces the default tile (benchmarks)."""
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
    cfg = config or default_config(weight)
    if x.numel() == 0 or weight.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[1], weight.shape[1])
    return launch_gemv(x, weight, cfg.block_n, min(cfg.block_k, triton.next_power_of_2(x.shape[2])), cfg.num_warps)


# An opaque op to torch.compile, as the MoE and cache kernels are: a compiled decode block stays one graph.
@torch.library.custom_op("seekforge::gemv", mutates_args=())
def launch_gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    """x [M, B, K], weight [B, N, K], any strides -> y [M, B, N] with y[:, b] = x[:, b] weight[b]^T."""
    m, batch, k = x.shape
    n = weight.shape[1]
    y = x.new_empty(m, batch, n)
    _gemv[(triton.cdiv(n, block_n), batch)](
        x, weight, y, m, n, k, x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        weight.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y


@launch_gemv.register_fake
def _(x, weight, block_n, block_k, num_warps) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1])


__all__ = ["GEMV_ROWS", "GemvConfig", "default_config", "gemv", "head_gemv"]
