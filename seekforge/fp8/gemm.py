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

Weights that read one input (a SwiGLU's w1 and w3, MLA's two input projections: `fp8_linears` and
`fp8_grouped_linears`, of which `fp8_linear` and `fp8_grouped_linear` are the one-weight case) share x's pass. Where
each weight's out dim but the last is a multiple of 128 (the experts': all equal too), every row of the table is one
GEMM over all of them, joined along out: their blocks quantised into one buffer and their dy's into one operand,
each into its slice; the output and the weight gradient cut into the weights'; dx = sum of dy_w W_w accumulated in
fp32 in one GEMM where autograd would add per-weight products. No W block or dy tile straddles two weights, so the
quantisation is each weight's own; otherwise each weight runs its GEMMs and dy on its own.

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
from seekforge.ops.quant import (BLOCK, QUANT, dequantise_blocks, dequantise_tiles, padded_tiles, quantise_blocks,
                                 quantise_rows, quantise_segments, segment_ends)
from seekforge.model.moe import grouped_linear


# ---------------------------------------------------------------- quantisation
def quantise_both(parts, offsets: torch.Tensor, segment_of_row: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """`quantise_segments` of x [m, k], given as `parts` [m, k_i] joined along k (the output gradients of weights
    joined along n; each k but the last a multiple of 128), through its kernel, which writes each part into its
    slice, where it runs (segment_of_row None: one segment)."""
    m, device = parts[0].shape[0], parts[0].device
    kernels = QUANT.on(device)
    if kernels is None:
        if segment_of_row is None:
            segment_of_row = torch.zeros(m, dtype=torch.long, device=device)
        return quantise_segments(_joined(parts), offsets, segment_of_row)
    return (*kernels.quantise_segments(parts, offsets, padded_tiles(m, offsets.shape[0])), segment_ends(offsets))


def quantise_operand(parts, offsets: torch.Tensor, segment_of_row: torch.Tensor | None,
                     both: bool) -> tuple[torch.Tensor | None, ...]:
    """A GEMM's left operand, `parts` joined along k: with `both`, `quantise_both` (the 128x1 tiles too, for a
    weight gradient); without, its 1x128 tiles only and None for the rest."""
    if both:
        return quantise_both(parts, offsets, segment_of_row)
    return (*quantise_rows(_joined(parts)), None, None, None)


def _joined(parts) -> torch.Tensor:
    """parts [m, k_i] as one [m, sum k_i] (a copy where there are several)."""
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def quantise_weights(weights, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantise_blocks` of the weights [..., n, k] joined along n (each n but the last a multiple of 128: no block
    straddles two; with `transposed`: of the transposes, joined along their last dimension), through the kernel,
    which writes each into its slice, where it runs."""
    kernels = QUANT.on(weights[0].device)
    if kernels is not None and weights[0].dim() in (2, 3):
        return kernels.quantise_blocks(weights, transposed)
    parts = [quantise_blocks(w.transpose(-2, -1) if transposed else w) for w in weights]
    if len(parts) == 1:
        return parts[0]
    dim = -1 if transposed else -2
    return torch.cat([q for q, _ in parts], dim), torch.cat([s for _, s in parts], dim)


def _groups(weights, equal: bool) -> list[tuple]:
    """The weights of one input, cut into those one GEMM takes joined along n: all of them where each n but the last
    is a multiple of 128 (`equal`: and all are the same), so that neither W's blocks nor dy's 1x128 tiles straddle
    two weights and the quantisation is each weight's own; else one a GEMM."""
    ns = [w.shape[-2] for w in weights]
    if (len(weights) > 1 and all(n % BLOCK == 0 for n in ns[:-1]) and (len(set(ns)) == 1 or not equal)
            and len({(w.shape[:-2], w.shape[-1], w.dtype) for w in weights}) == 1):
        return [tuple(weights)]
    return [(w,) for w in weights]


def _split(y: torch.Tensor, ns: list[int], dim: int) -> tuple[torch.Tensor, ...]:
    """A group's joined output (or weight gradient), cut into its weights' (their n's: ns) along `dim`."""
    return y.split(ns, dim) if len(ns) > 1 else (y,)


# ---------------------------------------------------------------- linear layers
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would return here: autocast's dtype under autocast, else the input's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _one_segment(x: torch.Tensor) -> torch.Tensor:
    """offsets of x's rows as one segment (made on the device: no host-to-device copy)."""
    return torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)


class _FP8Linears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_dtype, *weights):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            # x's tiles down the tokens, for the weight gradients, in the same pass
            xq, xs, xq_t, xs_t, _ = quantise_operand([x2], _one_segment(x2), None, any(ctx.needs_input_grad[2:]))
            groups, blocks, ys = _groups(weights, equal=False), [], []
            for group in groups:
                wq, ws = quantise_weights(group)
                ys += _split(blockwise_mm(xq, xs, wq, ws, True, out_dtype), [w.shape[0] for w in group], 1)
                blocks += [wq, ws]
        ctx.save_for_backward(xq_t, xs_t, *blocks)
        ctx.groups = [([w.shape[0] for w in group], group[0].dtype) for group in groups]
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return tuple(y.view(*x.shape[:-1], -1) for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        xq_t, xs_t, *blocks = ctx.saved_tensors
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx, dws, at = None, [], 0
        with torch.autocast(grads[0].device.type, enabled=False):
            for (ns, w_dtype), wq, ws in zip(ctx.groups, blocks[::2], blocks[1::2]):
                dy = grads[at:at + len(ns)]  # joined along n as the outputs were, in the quantisation
                wanted = any(ctx.needs_input_grad[2 + at:2 + at + len(ns)])
                dyq, dys, dyq_t, dys_t, _ = quantise_operand(dy, _one_segment(dy[0]), None, wanted)
                if wanted:
                    dws += _split(blockwise_mm(dyq_t, dys_t, xq_t, xs_t, False, w_dtype), ns, 0)
                else:
                    dws += [None] * len(ns)
                if ctx.needs_input_grad[0]:  # W's own blocks, transposed: 128x128 is square
                    part = blockwise_mm(dyq, dys, wq.t(), ws.t(), True, ctx.x_dtype)
                    dx = part if dx is None else dx + part
                at += len(ns)
        return (dx.view(ctx.x_shape) if dx is not None else None), None, *dws


def fp8_linears(x: torch.Tensor, weights) -> tuple[torch.Tensor, ...]:
    """F.linear(x, w) (no bias) for each w [out, in] of `weights`, x [..., in], with their GEMMs in FP8 and x
    quantised once (both ways) for all. Where each out but the last is a multiple of 128 the weights' blocks are
    joined along out: one GEMM each for the forward, the input gradient (dx = sum of dy_w W_w, accumulated in fp32)
    and the weight gradients; else a GEMM each, dx the sum of theirs."""
    return _FP8Linears.apply(x, _out_dtype(x), *weights)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with its three GEMMs in FP8: x [..., in], weight [out, in] -> [..., out]."""
    return fp8_linears(x, (weight,))[0]


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


def reference_grouped_weight_gradient(dy_t, dy_scale, x_t, x_scale, ends, out_dtype, parts: int = 1) -> torch.Tensor:
    """`fp8_grouped_weight_gradient`'s product (dW_e = dy_e^T x_e over the padded segments ending at ends; `parts`
    as it takes them), dequantised and multiplied in fp32."""
    col = torch.arange(dy_t.shape[1], device=dy_t.device)
    expert = torch.searchsorted(ends, col.to(ends.dtype), right=True).clamp_(max=ends.numel() - 1)
    one_hot = F.one_hot(expert, ends.numel()).float()  # columns past the last segment hold zeros
    dw = torch.einsum("nt,te,kt->enk", dequantise_tiles(dy_t, dy_scale), one_hot,
                      dequantise_tiles(x_t, x_scale)).to(out_dtype)
    return dw.unflatten(1, (parts, -1)).transpose(0, 1) if parts > 1 else dw


class _FP8GroupedLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, expert_of_row, out_dtype, *weights):
        kernel = grouped_kernels(x.device)
        with torch.autocast(x.device.type, enabled=False):
            # x's tiles down each expert's rows, for the weight gradients, in the same pass
            xq, xs, xq_t, xs_t, ends = quantise_operand([x], offsets, expert_of_row, any(ctx.needs_input_grad[4:]))
            groups, ys = _groups(weights, equal=True), []
            for group in groups:
                wq, ws = quantise_weights(group)
                if kernel is not None:
                    y = kernel.fp8_grouped_mm(xq, xs, wq, ws, offsets, out_dtype)
                else:
                    y = reference_grouped_mm(xq, xs, wq, ws, offsets, expert_of_row, out_dtype)
                ys += _split(y, [w.shape[1] for w in group], 1)
        ctx.save_for_backward(xq_t, xs_t, ends, offsets, expert_of_row, *weights)
        ctx.sizes, ctx.x_dtype = [len(group) for group in groups], x.dtype
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        xq_t, xs_t, ends, offsets, expert_of_row, *weights = ctx.saved_tensors
        kernel = grouped_kernels(grads[0].device)
        dx, dws, at = None, [], 0
        with torch.autocast(grads[0].device.type, enabled=False):
            for size in ctx.sizes:
                group = tuple(weights[at:at + size])
                dy = grads[at:at + size]  # joined along n as the outputs were, in the quantisation
                wanted = any(ctx.needs_input_grad[4 + at:4 + at + size])
                dyq, dys, dyq_t, dys_t, _ = quantise_operand(dy, offsets, expert_of_row, wanted)
                if wanted:  # one GEMM for the group, each weight's gradient written on its own
                    if kernel is not None:
                        dw = kernel.fp8_grouped_weight_gradient(dyq_t, dys_t, xq_t, xs_t, ends, group[0].dtype, size)
                    else:
                        dw = reference_grouped_weight_gradient(dyq_t, dys_t, xq_t, xs_t, ends, group[0].dtype, size)
                    dws += dw.unbind(0) if size > 1 else [dw]
                else:
                    dws += [None] * size
                if ctx.needs_input_grad[0]:
                    # dx = dy W_e: W's blocks transposed ([experts, in, out], the contracted dim innermost)
                    wq_t, ws_t = quantise_weights(group, transposed=True)
                    if kernel is not None:
                        part = kernel.fp8_grouped_mm(dyq, dys, wq_t, ws_t, offsets, ctx.x_dtype)
                    else:
                        part = reference_grouped_mm(dyq, dys, wq_t, ws_t, offsets, expert_of_row, ctx.x_dtype)
                    dx = part if dx is None else dx + part
                at += size
        return dx, None, None, None, *dws


def fp8_grouped_linears(x: torch.Tensor, weights, offsets: torch.Tensor,
                        expert_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`grouped_linear` (rows of x [m, in] sorted by expert) by each w [experts, out, in] of `weights` with their
    GEMMs in FP8: x and the output gradients in 1x128 tiles, each expert's weight in 128x128 blocks, and for the
    weight gradients 128x1 tiles that never straddle two experts. x is quantised once (both ways) for all; where the
    weights share one out, a multiple of 128 (a SwiGLU's w1 and w3), their blocks are joined along out: one grouped
    GEMM each for the forward, the input gradient (dx = sum of dy_w W_w, accumulated in fp32) and the weight
    gradients; else a GEMM each, dx the sum of theirs."""
    return _FP8GroupedLinears.apply(x, offsets, expert_of_row, _out_dtype(x), *weights)


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       expert_of_row: torch.Tensor) -> torch.Tensor:
    """`fp8_grouped_linears` of one weight w [experts, out, in]."""
    return fp8_grouped_linears(x, (w,), offsets, expert_of_row)[0]
