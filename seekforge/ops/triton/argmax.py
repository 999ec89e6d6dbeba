"""Greedy decoding's argmax over the vocabulary, in Triton.

torch.argmax over one row of the vocabulary's logits runs on few programs, on the critical path of a batch-1 step
(the next step's input is this token). Here a program takes a slice of a
row (its maximum and the first index holding it), and the last of a row's programs to finish
(`seekforge.ops.triton.arrivals`) picks among the slices: the first index of the row's maximum, as torch.argmax.
Rows are expected free of NaN (torch.argmax would take the first NaN).
`first_max` does this for values another kernel computes (the exponential race's: `seekforge.ops.triton.race`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.triton.arrivals import arrive, counters


@triton.jit
def _argmax(x_ptr, best_ptr, at_ptr, out_ptr, counter_ptr, V, stride_x, BLOCK: tl.constexpr,
            SLICES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    first_max(x, cols, row, best_ptr, at_ptr, out_ptr, counter_ptr, V, SLICES)


@triton.jit
def first_max(x, cols, row, best_ptr, at_ptr, out_ptr, counter_ptr, V, SLICES: tl.constexpr):
    """Program (row, piece)'s part of a row's argmax, over its values x at cols (-inf past V): it stores its slice's
    maximum and first index, and the last of the row's programs to finish writes the row's to out_ptr + row."""
    piece = tl.program_id(1)
    slices = tl.num_programs(1)  # best and at are [rows, slices]; SLICES, its power of two, sizes the final read
    best = tl.max(x, axis=0)
    at = tl.min(tl.where(x == best, cols, V), axis=0)  # the first index holding the maximum
    tl.store(best_ptr + row * slices + piece, best)
    tl.store(at_ptr + row * slices + piece, at)
    if arrive(counter_ptr + row, slices):
        pieces = tl.arange(0, SLICES)
        valid = pieces < slices
        bests = tl.load(best_ptr + row * slices + pieces, mask=valid, other=float("-inf"), cache_modifier=".cg")
        ats = tl.load(at_ptr + row * slices + pieces, mask=valid, other=V, cache_modifier=".cg")
        top = tl.max(bests, axis=0)
        first = tl.min(tl.where(bests == top, ats, V), axis=0)
        tl.store(out_ptr + row, tl.minimum(first, V - 1).to(tl.int64))  # in range even for a row of NaN


BLOCK = 4096  # logits a program: 25 programs for the 16b vocabulary (102400)


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V] (float, last dim contiguous) -> [R] int64, the first index of each row's maximum; written into
    `out` [R] (int64, contiguous) where given."""
    if x.dim() != 2 or not x.is_floating_point() or (x.shape[1] and x.stride(1) != 1):
        raise ConfigError(f"argmax wants floating logits [rows, vocab] with the vocab contiguous, got "
                          f"{tuple(x.shape)} {x.dtype} with strides {x.stride()}")
    rows, vocab = x.shape
    if vocab == 0:
        raise ConfigError("argmax over an empty vocabulary")
    if out is None:
        out = torch.empty(rows, device=x.device, dtype=torch.int64)
    elif out.shape != (rows,) or out.dtype != torch.int64 or out.stride() != (1,) or out.device != x.device:
        raise ConfigError(f"argmax writes [{rows}] int64 on {x.device}, got out {tuple(out.shape)} {out.dtype} on "
                          f"{out.device} with strides {out.stride()}")
    if rows == 0:
        return out
    slices, scratch = slice_scratch(rows, vocab, BLOCK, x.device)
    _argmax[(rows, slices)](x, *scratch, out, counters(x.device, rows), vocab, x.stride(0), BLOCK=BLOCK,
                            SLICES=triton.next_power_of_2(slices), num_warps=8)
    return out


def slice_scratch(rows: int, vocab: int, block: int, device) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
    """The slices of `block` columns a row of `vocab` takes, and first_max's stores of them (best, at)."""
    slices = triton.cdiv(vocab, block)
    return slices, (torch.empty(rows, slices, device=device, dtype=torch.float32),
                    torch.empty(rows, slices, device=device, dtype=torch.int32))


__all__ = ["argmax"]
