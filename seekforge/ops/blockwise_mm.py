"""FP8 GEMMs with DeepSeek-V3's blockwise scales, e4m3 operands accumulated in fp32: the dense one and the routed
experts' grouped one. FP8 training's GEMMs (`seekforge.fp8.gemm`) and the engine's FP8 weights
(`seekforge.model.fp8_weights`, through `ops.fp8_linear` and `FP8WeightExperts`) run them.

- Dense, `blockwise_mm`: a [m, k] in 1x128 tiles times b [n, k] transposed, b in 128x128 blocks or 1x128 tiles.
  On CUDA it runs `torch._scaled_mm` with block scales (cuBLASLt on sm90, torch's CUDA 12.9+ builds), whose scale
  layouts differ between torch versions: the first use on a device checks each candidate layout against the
  reference on a small problem and keeps the one that agrees (`scaled_mm_layout`; where none does, the device
  takes the reference, with a warning). Elsewhere the reference (`reference_mm`): dequantise, multiply in fp32.
  Its operands are padded to the sizes cuBLASLt takes on every call, except a weight kept padded (`pad_weight`:
  FP8 weights, which hold it once).
- Grouped: the Triton kernels of `seekforge.ops.triton.fp8_grouped` (op "fp8_grouped", where the backend runs
  Triton; "auto": on CUDA): torch's grouped scaled GEMM is rowwise-only on sm90.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from seekforge.ops.dispatch import TritonOp
from seekforge.ops.quant import (BLOCK, FP8, QUANT, cdiv, dequantise_blocks, dequantise_tiles, quantise_blocks,
                                 quantise_tiles)


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
    if s.shape == (rows, cols):
        return s
    return F.pad(s, (0, cols - s.shape[1], 0, rows - s.shape[0]), value=1.0)


def padded_sizes(m: int, k: int, n: int, b_blocks: bool) -> tuple[int, int, int]:
    """(m, k, n) rounded up to sizes cuBLASLt's block scaling takes: k to a multiple of 512, so that the scale grid's
    k extent is a multiple of 4 and its stride 16-byte aligned; m to 16; n to 128 for b in blocks, 16 for tiles."""
    return _round_up(m, 16), _round_up(k, 4 * BLOCK), _round_up(n, BLOCK if b_blocks else 16)


def pad_weight(b: torch.Tensor, b_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3 weight b [n, k] and its 128x128 block scales [n/128, k/128] (both rounded up), zero-padded (the scales
    with ones) to the shapes `scaled_mm_operands` pads them to, which it then takes as they are; b [:n, :k] and
    b_scale's [:n/128, :k/128] are the weight and scales again."""
    n, k = b.shape
    _, kp, np_ = padded_sizes(0, k, n, True)
    return _pad_fp8(b, np_, kp), _pad_scale(b_scale, np_ // BLOCK, kp // BLOCK)


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """s [r, c] stored column by column (stride (1, r)), whatever s's own strides."""
    return s.t().contiguous().t()


def scaled_mm_operands(a, a_scale, b, b_scale, b_blocks: bool, layout: str) -> tuple[torch.Tensor, ...]:
    """The arguments (mat1, mat2, scale_a, scale_b) of torch._scaled_mm for `reference_mm`'s product, laid out as
    torch's checks want them whatever the strides of the tensors given (a transposed weight and its transposed
    scale grid included). The operands are padded to shapes cuBLASLt's block scaling takes (`padded_sizes`; b and
    its scales given padded so, as `pad_weight` pads them, are taken as they are): mat1 [m, k] row-major, mat2
    [k, n] column-major; a's 1x128 tile scales [m, k/128] outer-dim-major (stride (1, m)); b's 128x128 block scales
    [k/128, n/128] with stride (1, k/128); b's 1x128 tile scales as `layout`, the probed orientation: "kn" [k/128, n]
    row-major (torch 2.9+), "nk" [n, k/128] with stride (1, n)."""
    mp, kp, np_ = padded_sizes(*a.shape, b.shape[0], b_blocks)
    kt = kp // BLOCK
    a, b = _pad_fp8(a, mp, kp), _pad_fp8(b, np_, kp)
    sa = _outer_major(_pad_scale(a_scale, mp, kt))
    if b_blocks:
        sb = _pad_scale(b_scale, np_ // BLOCK, kt).contiguous().t()
    else:
        sb = _outer_major(_pad_scale(b_scale, np_, kt))
        sb = sb if layout == "nk" else sb.t()
    return a, b.t(), sa, sb


def _scaled_mm(a, a_scale, b, b_scale, b_blocks: bool, out_dtype, layout: str) -> torch.Tensor:
    """`reference_mm` through torch._scaled_mm (`scaled_mm_operands`)."""
    mat1, mat2, sa, sb = scaled_mm_operands(a, a_scale, b, b_scale, b_blocks, layout)
    out = torch._scaled_mm(mat1, mat2, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)
    return out[:a.shape[0], :b.shape[0]]


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
                  f"work on {device} ({'; '.join(errors)}); FP8 GEMMs there dequantise their operands "
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


def blockwise_mm(a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype,
                 n: int | None = None) -> torch.Tensor:
    """`reference_mm`'s product, through torch._scaled_mm where it works on the operands' device. `n`: b, in blocks,
    and its scales come padded (`pad_weight`), its first n rows the weight (the output's columns)."""
    layout = scaled_mm_layout(a.device, b_blocks)
    if n is None:
        n = b.shape[0]
    elif layout is None:
        k = a.shape[1]
        b, b_scale = b[:n, :k], b_scale[:cdiv(n, BLOCK), :cdiv(k, BLOCK)]
    if layout is None:
        return reference_mm(a, a_scale, b, b_scale, b_blocks, out_dtype)
    return _scaled_mm(a, a_scale, b, b_scale, b_blocks, out_dtype, layout)[:, :n]


def weights_in_fp8(device: torch.device) -> bool:
    """Whether FP8 weights (e4m3, 128x128 block scales) multiply as FP8 GEMMs on `device`, their input quantised in
    1x128 tiles, rather than dequantised into the input's dtype: where the quantisation's kernels run (the
    backend's choice; "auto": CUDA) and, on CUDA, torch._scaled_mm takes the block scales (elsewhere the dequantised
    weight is faster than the fp32 reference); on the CPU, under Triton's interpreter, `reference_mm` stands in for
    the GEMM (what the tests run)."""
    return QUANT.on(device) is not None and (device.type != "cuda" or scaled_mm_layout(device, True) is not None)


def _load_grouped():
    from seekforge.ops.triton import fp8_grouped

    return fp8_grouped


# The experts' grouped GEMMs' Triton kernels (`seekforge.ops.triton.fp8_grouped`), where the backend runs them
# ("auto": on CUDA).
GROUPED = TritonOp("fp8_grouped", _load_grouped)
