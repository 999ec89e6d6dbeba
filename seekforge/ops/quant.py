"""DeepSeek-V3's fine-grained FP8 quantisation: e4m3 values with one fp32 scale per tile or block.

- Activations and gradients: 1x128 tiles, one scale per row and 128 consecutive elements of the contracted
  dimension (`quantise_tiles`); for the weight-gradient GEMM, whose contraction runs over the rows, 128x1
  tiles, 128 rows of one column per scale (`quantise_segments`).
- Weights: 128x128 blocks (`quantise_blocks`), the layout of DeepSeek's checkpoints, whose
  `weight_scale_inv` is this scale.
- Both tilings of rows sorted into segments (experts; a dense layer's rows are one), for the forward and the
  weight gradient (`quantise_segments`): 1x128 tiles of the rows and 128x1 tiles down each segment's rows, the
  latter transposed and each segment zero-padded to whole 128-row tiles, so that they are the 1x128 tiles of a
  padded transpose.

`seekforge.ops.triton.fp8_quant` computes the same, bit for bit, in one pass each on CUDA (op "fp8_quant":
where the backend runs Triton; "auto": on CUDA): `quantise_rows` takes it where it runs.

A scale is amax / 448 (448 = e4m3's largest finite value), so a tile's largest magnitude maps onto 448 and
value = q * scale. A tile of zeros gets scale 1 (its values are exact zeros whatever the scale). Shapes that
are not multiples of 128 get a padded scale grid: the last tile or block is partial and its scale covers the
elements that exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seekforge.ops.dispatch import TritonOp

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 128


def cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    # divided by a tensor: CUDA divides by a Python scalar as a multiply by its rounded reciprocal, which differs
    # from amax / 448 correctly rounded (the CPU's, and the kernels' div_rn) in the last bit for about half of all
    # values, so the kernels would not match the reference on the GPU
    return torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcast to x), saturated to e4m3's range, as float8_e4m3fn."""
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def _pad_last(x: torch.Tensor, dims: int) -> torch.Tensor:
    """x zero-padded so that its last `dims` dimensions are multiples of BLOCK."""
    pad = []
    for size in reversed(x.shape[-dims:]):
        pad += [0, cdiv(size, BLOCK) * BLOCK - size]
    return F.pad(x, pad) if any(pad) else x


def quantise_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dimension: x [..., k] -> (q [..., k] e4m3, scale [..., ceil(k / 128)] fp32)."""
    k = x.shape[-1]
    tiles = _pad_last(x.float(), 1).unflatten(-1, (-1, BLOCK))  # [..., k / 128, 128]
    scale = _scale_of(tiles.abs().amax(dim=-1))
    q = _to_fp8(tiles, scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return q, scale


def _load_quant():
    from seekforge.ops.triton import fp8_quant

    return fp8_quant


# The quantisation's Triton kernels (`seekforge.ops.triton.fp8_quant`), where the backend runs them ("auto": on CUDA).
QUANT = TritonOp("fp8_quant", _load_quant)


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantise_tiles` of a 2-d x, through its kernel where it runs."""
    kernels = QUANT.on(x.device)
    return kernels.quantise_tiles(x) if kernels is not None else quantise_tiles(x)


def dequantise_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`quantise_tiles`'s inverse: q [..., k] * its tile's scale, as `dtype`."""
    k = q.shape[-1]
    return (q.float() * scale.repeat_interleave(BLOCK, dim=-1)[..., :k]).to(dtype)


def quantise_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks over the last two dimensions: w [..., n, k] -> (q [..., n, k] e4m3,
    scale [..., ceil(n / 128), ceil(k / 128)] fp32). A leading dimension (experts) quantises each matrix
    on its own."""
    n, k = w.shape[-2:]
    padded = _pad_last(w.float(), 2)
    blocks = padded.unflatten(-1, (-1, BLOCK)).unflatten(-3, (-1, BLOCK))  # [..., n/128, 128, k/128, 128]
    scale = _scale_of(blocks.abs().amax(dim=(-3, -1)))  # [..., n/128, k/128]
    q = _to_fp8(blocks, scale.unsqueeze(-1).unsqueeze(-3)).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k], scale


def dequantise_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`quantise_blocks`'s inverse: q [..., n, k] * its block's scale, as `dtype`."""
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :n, :k]
    return (q.float() * full).to(dtype)


def padded_tiles(rows: int, segments: int) -> int:
    """A bound on the 128-row tiles of `rows` rows in `segments` segments, each padded to whole tiles (at least one):
    ceil(rows / 128) + segments - 1 (each segment's partial tile adds at most one), rounded up to a multiple of 4
    (torch._scaled_mm's block-scaled operands want the contracted extent a multiple of 512); known without host
    synchronisation."""
    return cdiv(max(cdiv(rows, BLOCK), 1) + segments - 1, 4) * 4


def segment_ends(offsets: torch.Tensor) -> torch.Tensor:
    """The cumulative ends (int32) of segments of rows ending at offsets [segments], each padded to a positive
    multiple of 128 rows."""
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
    return (((counts + BLOCK - 1) // BLOCK).clamp(min=1) * BLOCK).cumsum(0).to(torch.int32)


def quantise_segments(x: torch.Tensor, offsets: torch.Tensor, segment_of_row: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] with rows sorted into segments (offsets [segments]: their cumulative ends; segment_of_row [m]) ->
    (q [m, k], scale [m, ceil(k / 128)]: `quantise_tiles(x)`; q_t [k, 128 t], scale_t [k, t]: `quantise_tiles` of
    x's transpose with each segment's rows in a zero-padded segment of whole 128-row tiles, so that its tiles are
    128x1 tiles of x, none straddling two segments; ends: `segment_ends(offsets)`). t = `padded_tiles(m,
    segments)`; the tiles past the last segment hold zeros with scale 1."""
    ends = segment_ends(offsets)
    padded_starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).long()
    rows = torch.arange(x.shape[0], device=x.device)
    at = padded_starts[segment_of_row] + rows - starts[segment_of_row]  # where each row goes
    x_t = x.new_zeros(x.shape[1], padded_tiles(x.shape[0], offsets.numel()) * BLOCK).index_copy_(1, at, x.t())
    return (*quantise_tiles(x), *quantise_tiles(x_t), ends)
