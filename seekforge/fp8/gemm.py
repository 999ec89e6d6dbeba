"""FP8 GEMMs with DeepSeek-V3's blockwise scaling, forward and backward, for linear layers and grouped experts.

Every GEMM multiplies e4m3 operands and accumulates in fp32; its operands are quantised where they are made:

| GEMM | left operand | right operand |
|---|---|---|
| forward y = x W^T | x, 1x128 tiles | W, 128x128 blocks |
| input gradient dx = dy W | dy, 1x128 tiles | W, the same blocks (transposed) |
| weight gradient dW = dy^T x | dy, 128x1 tiles | x, 128x1 tiles |

(the weight gradient contracts over tokens, so its tiles run down the tokens). One pass over x in the forward
quantises it both ways (`quantise_segments`: the 1x128 tiles for the forward, the 128x1 tiles transposed for the
weight gradient, which the backward keeps instead of x), and one pass over dy in the backward likewise. A linear
layer keeps its forward's quantised weight for the input gradient (128x128 blocks are square: the transpose's
scales are the transposed grid); the experts, whose weights are most of a MoE model's, quantise theirs again in the
backward, transposed, in one pass, rather than hold an FP8 copy of every expert weight until the backward. fp32
master weights stay as they are.

Three ways to run a GEMM (`seekforge.ops.blockwise_mm`, shared with the engine's FP8 weights):
- `torch._scaled_mm` with block scales (cuBLASLt on sm90, torch's CUDA 12.9+ builds), for dense GEMMs on
  CUDA (`blockwise_mm`; its layouts probed on first use: call `scaled_mm_layout` before torch.compile traces).
- Triton kernels for the routed experts' three grouped GEMMs (`seekforge.ops.triton.fp8_grouped`; torch's
  grouped scaled GEMM is rowwise-only on sm90), where the backend runs Triton (`seekforge.ops.backend`,
  op "fp8_grouped"; "auto": on CUDA). On CUDA they are the expert GEMMs' only path: where they cannot run there
  (backend "torch" for the op, SEEKFORGE_TRITON=0, Triton missing) the expert GEMMs raise ConfigError.
- the reference: dequantise (q * scale) and multiply in fp32. It is what the CPU runs and what the tests
  check against.

The quantisation runs Triton kernels (`seekforge.ops.triton.fp8_quant`, op "fp8_quant") where the backend runs
Triton, bit-exact against its PyTorch references (`seekforge.ops.quant`), which run elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seekforge.errors import ConfigError
from seekforge.ops.blockwise_mm import GROUPED, blockwise_mm
from seekforge.ops.quant import (QUANT, dequantise_blocks, dequantise_tiles, padded_tiles, quantise_blocks,
                                 quantise_rows, quantise_segments, segment_ends)
from seekforge.model.moe import grouped_linear


# ---------------------------------------------------------------- quantisation
def quantise_both(x: torch.Tensor, offsets: torch.Tensor,
                  segment_of_row: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """`quantise_segments` of x [m, k] (segment_of_row None: one segment), through its kernel where it runs."""
    kernels = QUANT.on(x.device)
    if kernels is None:
        if segment_of_row is None:
            segment_of_row = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return quantise_segments(x, offsets, segment_of_row)
    return (*kernels.quantise_segments(x, offsets, padded_tiles(x.shape[0], offsets.shape[0])),
            segment_ends(offsets))


def quantise_weight(w: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantise_blocks` of w [..., n, k] (with `transposed`: of its transpose), through its kernel where it runs."""
    kernels = QUANT.on(w.device)
    if kernels is not None and w.dim() in (2, 3):
        return kernels.quantise_blocks(w, transposed)
    return quantise_blocks(w.transpose(-2, -1) if transposed else w)


# ---------------------------------------------------------------- linear layer
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would return here: autocast's dtype under autocast, else the input's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _one_segment(x: torch.Tensor) -> torch.Tensor:
    """offsets of x's rows as one segment (made on the device: no host-to-device copy)."""
    return torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[1]:  # x's tiles down the tokens, for the weight gradient, in the same pass
                xq, xs, xq_t, xs_t, _ = quantise_both(x2, _one_segment(x2), None)
            else:
                (xq, xs), xq_t, xs_t = quantise_rows(x2), None, None
            wq, ws = quantise_weight(weight)
            y = blockwise_mm(xq, xs, wq, ws, True, out_dtype)
        ctx.save_for_backward(xq_t, xs_t, wq, ws)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        xq_t, xs_t, wq, ws = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx = dw = None
            if ctx.needs_input_grad[1]:
                dyq, dys, dyq_t, dys_t, _ = quantise_both(dy2, _one_segment(dy2), None)
                dw = blockwise_mm(dyq_t, dys_t, xq_t, xs_t, False, ctx.w_dtype)
            else:
                dyq, dys = quantise_rows(dy2)
            if ctx.needs_input_grad[0]:  # W's own blocks, transposed: 128x128 is square
                dx = blockwise_mm(dyq, dys, wq.t(), ws.t(), True, ctx.x_dtype).view(ctx.x_shape)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with its three GEMMs in FP8: x [..., in], weight [out, in] -> [..., out]."""
    return _FP8Linear.apply(x, weight, _out_dtype(x))


# ---------------------------------------------------------------- grouped expert GEMM
def grouped_kernels(device: torch.device):
    """The expert GEMMs' kernel module where they run on `device`, else None (the reference path). On CUDA the
    kernels are the only path: torch has no grouped GEMM with block scales, and the reference's fp32 operands
    (dequantised, [rows, out, in] outer products for the weight gradient) take too much memory at real sizes."""
    kernels = GROUPED.on(device)
    if kernels is None and device.type == "cuda":
        raise ConfigError("FP8 training's expert GEMMs on CUDA run Triton kernels (seekforge.ops.triton.fp8_grouped), "
                          "which the current choice leaves off (ops.backend 'torch' for op 'fp8_grouped', "
                          "SEEKFORGE_TRITON=0, or Triton not installed): use the backend 'auto' or 'triton' with "
                          "Triton installed, or train with fp8=none")
    return kernels


def reference_grouped_mm(a, a_scale, w, w_scale, offsets, expert_of_row, out_dtype) -> torch.Tensor:
    """`fp8_grouped_mm`'s product (rows of a [m, k] in 1x128 tiles times w [experts, n, k] in 128x128 blocks,
    transposed), dequantised and multiplied in fp32."""
    return grouped_linear(dequantise_tiles(a, a_scale), dequantise_blocks(w, w_scale), offsets,
                          expert_of_row).to(out_dtype)


def reference_grouped_weight_gradient(dy_t, dy_scale, x_t, x_scale, ends, out_dtype) -> torch.Tensor:
    """`fp8_grouped_weight_gradient`'s product (dW_e = dy_e^T x_e over the padded segments ending at ends),
    dequantised and multiplied in fp32."""
    col = torch.arange(dy_t.shape[1], device=dy_t.device)
    expert = torch.searchsorted(ends, col.to(ends.dtype), right=True).clamp_(max=ends.numel() - 1)
    one_hot = F.one_hot(expert, ends.numel()).float()  # columns past the last segment hold zeros
    return torch.einsum("nt,te,kt->enk", dequantise_tiles(dy_t, dy_scale), one_hot,
                        dequantise_tiles(x_t, x_scale)).to(out_dtype)


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, expert_of_row, out_dtype):
        kernel = grouped_kernels(x.device)
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[1]:  # x's tiles down each expert's rows, for the weight gradient, in the same pass
                xq, xs, xq_t, xs_t, ends = quantise_both(x, offsets, expert_of_row)
            else:
                (xq, xs), xq_t, xs_t, ends = quantise_rows(x), None, None, None
            wq, ws = quantise_weight(w)
            if kernel is not None:
                y = kernel.fp8_grouped_mm(xq, xs, wq, ws, offsets, out_dtype)
            else:
                y = reference_grouped_mm(xq, xs, wq, ws, offsets, expert_of_row, out_dtype)
        ctx.save_for_backward(xq_t, xs_t, ends, w, offsets, expert_of_row)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xq_t, xs_t, ends, w, offsets, expert_of_row = ctx.saved_tensors
        kernel = grouped_kernels(dy.device)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                dyq, dys, dyq_t, dys_t, _ = quantise_both(dy, offsets, expert_of_row)
                if kernel is not None:
                    dw = kernel.fp8_grouped_weight_gradient(dyq_t, dys_t, xq_t, xs_t, ends, w.dtype)
                else:
                    dw = reference_grouped_weight_gradient(dyq_t, dys_t, xq_t, xs_t, ends, w.dtype)
            else:
                dyq, dys = quantise_rows(dy)
            if ctx.needs_input_grad[0]:
                # dx = dy W_e: W's blocks transposed ([experts, in, out], the contracted dim innermost)
                wq_t, ws_t = quantise_weight(w, transposed=True)
                if kernel is not None:
                    dx = kernel.fp8_grouped_mm(dyq, dys, wq_t, ws_t, offsets, ctx.x_dtype)
                else:
                    dx = reference_grouped_mm(dyq, dys, wq_t, ws_t, offsets, expert_of_row, ctx.x_dtype)
        return dx, dw, None, None, None


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       expert_of_row: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` (rows of x [m, in] sorted by expert, w [experts, out, in]) with its three GEMMs in FP8:
    x and the output gradient in 1x128 tiles, each expert's weight in 128x128 blocks, and for the weight
    gradient 128x1 tiles that never straddle two experts."""
    return _FP8GroupedLinear.apply(x, w, offsets, expert_of_row, _out_dtype(x))


