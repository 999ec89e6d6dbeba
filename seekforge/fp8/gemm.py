"""FP8 GEMMs with DeepSeek-V3's blockwise scaling, forward and backward, for linear layers and grouped experts.

Every GEMM multiplies e4m3 operands and accumulates in fp32; its operands are quantised where it runs:

| GEMM | left operand | right operand |
|---|---|---|
| forward y = x W^T | x, 1x128 tiles | W, 128x128 blocks |
| input gradient dx = dy W | dy, 1x128 tiles | W, the same blocks |
| weight gradient dW = dy^T x | dy, 128x1 tiles | x, 128x1 tiles |

(the weight gradient contracts over tokens, so its tiles run down the tokens). The high-precision input is
kept for the backward and quantised again in the weight-gradient tiles; fp32 master weights stay as they are.

Three ways to run one:
- `torch._scaled_mm` with block scales (cuBLASLt on sm90, torch's CUDA 12.9+ builds), for dense GEMMs on
  CUDA. Its scale layouts differ between torch versions, so the first use on a device checks each candidate
  layout against the reference on a small problem and keeps the one that agrees; where none does, the
  device takes the reference path (with a warning).
- Triton kernels for the routed experts' three grouped GEMMs (`seekforge.ops.triton.fp8_grouped`; torch's
  grouped scaled GEMM is rowwise-only on sm90), where the backend runs Triton (`seekforge.ops.backend`,
  op "fp8_grouped"; "auto": on CUDA). The activations' quantisation stays in torch, where compile fuses it.
  On CUDA they are the expert GEMMs' only path: where they cannot run there (backend "torch" for the op,
  SEEKFORGE_TRITON=0, Triton missing) the expert GEMMs raise ConfigError.
- the reference: dequantise (q * scale) and multiply in fp32. It is what the CPU runs and what the tests
  check against.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from seekforge.errors import ConfigError
from seekforge.ops.dispatch import TritonOp
from seekforge.ops.quant import (BLOCK, FP8, cdiv, dequantise_blocks, dequantise_row_tiles, dequantise_tiles,
                                 grouped_row_tiles, quantise_blocks, quantise_row_tiles, quantise_tiles)
from seekforge.model.moe import _grouped_mm_works, grouped_linear


# ---------------------------------------------------------------- one dense GEMM
def reference_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """a [m, k] e4m3 in 1x128 tiles (a_scale [m, k/128]) times b [n, k] e4m3 transposed, b in 128x128 blocks
    (b_scale [n/128, k/128]) or 1x128 tiles (b_blocks False, b_scale [n, k/128]) -> [m, n] as out_dtype,
    dequantised and multiplied in fp32."""
    b_dq = dequantise_blocks(b, b_scale) if b_blocks else dequantise_tiles(b, b_scale)
    return (dequantise_tiles(a, a_scale) @ b_dq.t()).to(out_dtype)


def _round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An e4m3 matrix zero-padded to [rows, cols] (through its bytes: e4m3's zero is the byte 0)."""
    if q.shape == (rows, cols):
        return q.contiguous()
    return F.pad(q.view(torch.uint8), (0, cols - q.shape[1], 0, rows - q.shape[0])).view(FP8)


def _pad_scale(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(s, (0, cols - s.shape[1], 0, rows - s.shape[0]), value=1.0)


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """s [r, c] stored column by column (stride (1, r)): cuBLASLt's layout for 1x128 tile scales."""
    return s.t().contiguous().t()


def _scaled_mm(a, a_scale, b, b_scale, b_blocks: bool, out_dtype, layout: str) -> torch.Tensor:
    """`reference_mm` through torch._scaled_mm. The operands are padded to shapes cuBLASLt's block scaling
    takes (k to a multiple of 512, so the scale grid's k extent is a multiple of 4; m to 16; n to 128 for
    blocks, 16 for tiles); `layout` is the probed orientation of b's tile scales."""
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = _round_up(m, 16), _round_up(k, 4 * BLOCK), _round_up(n, BLOCK if b_blocks else 16)
    kt = kp // BLOCK
    a, b = _pad_fp8(a, mp, kp), _pad_fp8(b, np_, kp)
    sa = _outer_major(_pad_scale(a_scale, mp, kt))
    if b_blocks:
        sb = _pad_scale(b_scale, np_ // BLOCK, kt).t()  # [k/128, n/128], stride (1, k/128)
    else:
        sb = _outer_major(_pad_scale(b_scale, np_, kt))  # [n, k/128], stride (1, n)
        sb = sb if layout == "nk" else sb.t()
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)
    return out[:m, :n]


_LAYOUTS: dict = {}  # (device, b_blocks) -> the working layout of torch._scaled_mm, or None: the reference


def _probe(device: torch.device, b_blocks: bool) -> str | None:
    """The b-scale layout with which torch._scaled_mm agrees with the reference on this device, or None."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, sa = quantise_tiles(torch.randn(40, 640, generator=gen).to(device))  # partial tiles, k/128 = 5
    b_hp = torch.randn(200, 640, generator=gen).to(device)
    b, sb = quantise_blocks(b_hp) if b_blocks else quantise_tiles(b_hp)
    want = reference_mm(a, sa, b, sb, b_blocks, torch.float32)
    errors = []
    for layout in (("kn",) if b_blocks else ("nk", "kn")):
        try:
            got = _scaled_mm(a, sa, b, sb, b_blocks, torch.float32, layout)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            errors.append(f"{layout}: {str(e).splitlines()[0]}")
            continue
        if torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            return layout
        errors.append(f"{layout}: results differ from the reference")
    warnings.warn(f"FP8: torch._scaled_mm with {'128x128 block' if b_blocks else '1x128 tile'} scales does not "
                  f"work on {device} ({'; '.join(errors)}); FP8 GEMMs there dequantise and multiply in fp32 "
                  "(right numerics, no speed-up). Blockwise scaled_mm needs an sm90 GPU and a CUDA 12.9+ build "
                  "of torch.", stacklevel=3)
    return None


def scaled_mm_layout(device: torch.device, b_blocks: bool) -> str | None:
    """Where torch._scaled_mm runs these scalings on `device`, the layout it takes (probed once; call it
    before torch.compile traces a model); None: the reference path."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    key = (str(device), b_blocks)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _probe(device, b_blocks)
    return _LAYOUTS[key]


def blockwise_mm(a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """`reference_mm`'s product, through torch._scaled_mm where it works on the operands' device."""
    layout = scaled_mm_layout(a.device, b_blocks)
    if layout is None:
        return reference_mm(a, a_scale, b, b_scale, b_blocks, out_dtype)
    return _scaled_mm(a, a_scale, b, b_scale, b_blocks, out_dtype, layout)


# ---------------------------------------------------------------- linear layer
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would return here: autocast's dtype under autocast, else the input's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _weight_gradient(dy: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dy^T x over rows, both in 128x1 tiles: the tiles are 1x128 tiles of the transposes."""
    dyq, dys = quantise_tiles(dy.t())
    xq, xs = quantise_tiles(x.t())
    return blockwise_mm(dyq, dys, xq, xs, False, out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            xq, xs = quantise_tiles(x.reshape(-1, x.shape[-1]))
            wq, ws = quantise_blocks(weight)
            y = blockwise_mm(xq, xs, wq, ws, True, out_dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            dx = dw = None
            if ctx.needs_input_grad[0]:
                dyq, dys = quantise_tiles(dy2)
                wq, ws = quantise_blocks(weight.t())  # W's own blocks, transposed: 128x128 is square
                dx = blockwise_mm(dyq, dys, wq, ws, True, x.dtype).view(x.shape)
            if ctx.needs_input_grad[1]:
                dw = _weight_gradient(dy2, x2, weight.dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with its three GEMMs in FP8: x [..., in], weight [out, in] -> [..., out]."""
    return _FP8Linear.apply(x, weight, _out_dtype(x))


# ---------------------------------------------------------------- grouped expert GEMM
def _load_grouped():
    from seekforge.ops.triton import fp8_grouped

    return fp8_grouped


# The expert GEMMs' Triton kernels (`seekforge.ops.triton.fp8_grouped`): e4m3 operands, fp32 accumulation. Where the
# backend runs them (`seekforge.ops.backend`; "auto": on CUDA) they replace the dequantising path below.
GROUPED = TritonOp("fp8_grouped", _load_grouped)


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


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `grouped_linear` runs torch._grouped_mm here (its own condition)."""
    return _grouped_mm_works(x, w) and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())


def _padded_rows(offsets: torch.Tensor, expert_of_row: torch.Tensor,
                 align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows sorted by expert laid out with each expert's in a zero-padded segment of a positive multiple of `align`
    rows: (where each row goes, the segments' cumulative ends as int32, the rows of a buffer that holds them: the
    bound cdiv(rows, align) * align + align * experts, a multiple of `align` known without host synchronisation)."""
    offsets = offsets.long()
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    padded = ((counts + align - 1) // align * align).clamp(min=align)
    ends = padded.cumsum(0)
    rows = torch.arange(expert_of_row.numel(), device=expert_of_row.device)
    at = (ends - padded)[expert_of_row] + rows - (offsets - counts)[expert_of_row]
    return at, ends.to(torch.int32), _round_up(expert_of_row.numel(), align) + align * offsets.numel()


def _grouped_weight_gradient(dy, x, offsets, expert_of_row, n_experts: int) -> torch.Tensor:
    """Per expert e, dy_e^T x_e over its rows -> [experts, out, in] (fp32 on the reference path)."""
    if _grouped_ok(x, x):
        return torch._grouped_mm(dy.t(), x, offs=offsets)
    out = dy.new_zeros(n_experts, dy.shape[1], x.shape[1])
    return out.index_add_(0, expert_of_row, dy.unsqueeze(2) * x.unsqueeze(1))


def weight_gradient_operands(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                             expert_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weight-gradient kernel's operands (`fp8_grouped_weight_gradient`'s dy_t, dy_scale, x_t, x_scale, offsets)
    of dy [m, out] and x [m, in], rows sorted by expert: both transposed, each expert's rows padded to whole 128-row
    tiles (zeros, which leave the tiles' scales as they are), so that their 128x1 tiles, none straddling two
    experts, are the 1x128 tiles of the transposes."""
    at, ends, total = _padded_rows(offsets, expert_of_row, BLOCK)
    dy_t = dy.new_zeros(dy.shape[1], total).index_copy_(1, at, dy.t())
    x_t = x.new_zeros(x.shape[1], total).index_copy_(1, at, x.t())
    return (*quantise_tiles(dy_t), *quantise_tiles(x_t), ends)


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, expert_of_row, out_dtype):
        ctx.save_for_backward(x, w, offsets, expert_of_row)
        kernel = grouped_kernels(x.device)
        with torch.autocast(x.device.type, enabled=False):
            if kernel is not None:
                return kernel.fp8_grouped_mm(*quantise_tiles(x), *quantise_blocks(w), offsets, out_dtype)
            x_dq = dequantise_tiles(*quantise_tiles(x))
            w_dq = dequantise_blocks(*quantise_blocks(w))
            return grouped_linear(x_dq, w_dq, offsets, expert_of_row).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, expert_of_row = ctx.saved_tensors
        kernel = grouped_kernels(x.device)
        dx = dw = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dyq, dys = quantise_tiles(dy)
                wq, ws = quantise_blocks(w)  # the forward's blocks; dx = dy W_e reads them transposed
                if kernel is not None:
                    dx = kernel.fp8_grouped_mm(dyq, dys, wq, ws, offsets, x.dtype, transposed=True)
                else:
                    wt_dq = dequantise_blocks(wq, ws).transpose(-2, -1)  # [experts, in, out]
                    dx = grouped_linear(dequantise_tiles(dyq, dys), wt_dq, offsets, expert_of_row).to(x.dtype)
            if ctx.needs_input_grad[1]:
                if kernel is not None:
                    dw = kernel.fp8_grouped_weight_gradient(
                        *weight_gradient_operands(dy, x, offsets, expert_of_row), w.dtype)
                else:
                    tile_of_row, n_tiles = grouped_row_tiles(offsets, expert_of_row)
                    dy_dq = dequantise_row_tiles(*quantise_row_tiles(dy, tile_of_row, n_tiles), tile_of_row)
                    x_dq = dequantise_row_tiles(*quantise_row_tiles(x, tile_of_row, n_tiles), tile_of_row)
                    dw = _grouped_weight_gradient(dy_dq, x_dq, offsets, expert_of_row, w.shape[0]).to(w.dtype)
        return dx, dw, None, None, None


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       expert_of_row: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` (rows of x [m, in] sorted by expert, w [experts, out, in]) with its three GEMMs in FP8:
    x and the output gradient in 1x128 tiles, each expert's weight in 128x128 blocks, and for the weight
    gradient 128x1 tiles that never straddle two experts."""
    return _FP8GroupedLinear.apply(x, w, offsets, expert_of_row, _out_dtype(x))


