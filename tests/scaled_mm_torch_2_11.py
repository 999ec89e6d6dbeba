"""A stand-in for torch._scaled_mm where it cannot run (a CPU), as torch 2.11 takes its arguments: its rules transcribed
from aten/src/ATen/native/cuda/ScaledBlas.cpp (`get_joint_scaling`'s scale shapes and strides for each scaling, b's
checked on mat2's and scale_b's transposes, as torch does; cuBLASLt's FP8 GEMM's mat1 row-major, mat2 column-major,
sizes multiples of 16), refusing as torch does (a RuntimeError), and the product as cuBLASLt reads the scales, in
float64."""

import torch

from seekforge.ops.quant import BLOCK, FP8, cdiv


def _size_stride(scale, dim, size, stride) -> bool:
    """torch's check_size_stride: a dimension of size 1 may have any stride."""
    return scale.size(dim) == size and (size <= 1 or scale.stride(dim) == stride)


def _tiles_1x128(t, scale) -> bool:
    """is_blockwise_1x128_scaling: t [r, c], scale [r, c/128] outer-dim-major."""
    return (scale.dtype == torch.float32 and scale.dim() == 2 and _size_stride(scale, 0, t.size(0), 1)
            and _size_stride(scale, 1, cdiv(t.size(1), BLOCK), t.size(0)))


def _blocks_128x128(t, scale) -> bool:
    """is_blockwise_128x128_scaling: t [r, c], scale [r/128, c/128] with its row stride a multiple of 4."""
    cols = cdiv(t.size(1), BLOCK)
    return (scale.dtype == torch.float32 and scale.dim() == 2
            and _size_stride(scale, 0, cdiv(t.size(0), BLOCK), cdiv(cols, 4) * 4) and _size_stride(scale, 1, cols, 1))


_SCALINGS = {"tiles": _tiles_1x128, "blocks": _blocks_128x128}
_PAIRS = (("blocks", "tiles"), ("tiles", "blocks"), ("tiles", "tiles"))  # the block-scaled pairs torch takes


def _expand(scale, scaling, rows, cols):
    """A scale grid over t [rows, cols] (laid out as the check above reads it), one scale an element."""
    full = scale.repeat_interleave(BLOCK, dim=1)
    if scaling == "blocks":
        full = full.repeat_interleave(BLOCK, dim=0)
    return full[:rows, :cols].double()


def scaled_mm_as_torch_2_11(mat1, mat2, scale_a, scale_b, out_dtype, use_fast_accum=False):
    if mat1.dtype != FP8 or mat2.dtype != FP8 or mat1.dim() != 2 or mat2.dim() != 2:
        raise RuntimeError("mat1 and mat2 must be e4m3 matrices")
    if mat1.stride(1) != 1 or mat2.stride(0) != 1:
        raise RuntimeError(f"cuBLASLt's FP8 GEMM wants mat1 row-major and mat2 column-major, got strides "
                           f"{mat1.stride()} and {mat2.stride()}")
    if mat1.size(1) % 16 or mat2.size(0) % 16 or mat2.size(1) % 16:
        raise RuntimeError(f"sizes must be multiples of 16, got {tuple(mat1.shape)} and {tuple(mat2.shape)}")
    for lhs, rhs in _PAIRS:
        if _SCALINGS[lhs](mat1, scale_a) and _SCALINGS[rhs](mat2.t(), scale_b.t()):
            a = mat1.double() * _expand(scale_a, lhs, *mat1.shape)
            b_t = mat2.t().double() * _expand(scale_b.t(), rhs, mat2.size(1), mat2.size(0))
            return (a @ b_t.t()).to(out_dtype)
    raise RuntimeError(f"Invalid scaling configuration: scale_a {tuple(scale_a.shape)} stride {scale_a.stride()}, "
                       f"scale_b {tuple(scale_b.shape)} stride {scale_b.stride()}")
