"""The exponential race of sampling in one launch: each program draws its slice of a row's uniforms
(`seekforge.ops.rng`: SplitMix64 in uint64 lanes), scores its probabilities p / -log(u), and takes part in the row's
argmax as greedy decoding's kernel does (`seekforge.ops.triton.argmax.first_max`), so the draws never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.rng import STREAMS, check_stream
from seekforge.ops.triton.argmax import first_max, slice_scratch
from seekforge.ops.triton.arrivals import counters as arrivals


@triton.jit
def _splitmix64(state, n):
    """The n-th output of SplitMix64 seeded with `state` (uint64)."""
    z = state + n * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _race(p_ptr, key_ptr, counter_ptr, best_ptr, at_ptr, out_ptr, arrival_ptr, V, stride_p, STREAM: tl.constexpr,
          STREAMS: tl.constexpr, BLOCK: tl.constexpr, SLICES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + row).to(tl.uint64, bitcast=True)
    counter = tl.load(counter_ptr + row).to(tl.uint64, bitcast=True)
    base = _splitmix64(key, counter * STREAMS + (STREAM + 1))
    bits = _splitmix64(base, (cols + 1).to(tl.uint64))
    u = ((bits >> 40) | 1).to(tl.float32) * (1.0 / 16777216.0)
    p = tl.load(p_ptr + row * stride_p + cols, mask=cols < V, other=0.0)
    score = tl.where(cols < V, p / -tl.log(u), float("-inf"))
    first_max(score, cols, row, best_ptr, at_ptr, out_ptr, arrival_ptr, V, SLICES)


BLOCK = 4096  # columns a program, as the argmax's


def exponential_race(probs: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor, stream: int) -> torch.Tensor:
    """probs [R, V] float32 (the vocab contiguous), keys and counters [R] int64 -> [R] int64 tokens: argmax of
    probs / -log(uniform(keys, counters, stream)) per row, as `seekforge.ops.rng.exponential_race_reference`."""
    if probs.dim() != 2 or probs.dtype != torch.float32 or (probs.shape[1] and probs.stride(1) != 1):
        raise ConfigError(f"exponential_race wants float32 probabilities [rows, vocab] with the vocab contiguous, "
                          f"got {tuple(probs.shape)} {probs.dtype} with strides {probs.stride()}")
    rows, vocab = probs.shape
    for name, t in (("keys", keys), ("counters", counters)):
        if t.shape != (rows,) or t.dtype != torch.int64 or t.device != probs.device:
            raise ConfigError(f"exponential_race wants {name} [{rows}] int64 on {probs.device}, got "
                              f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if vocab == 0:
        raise ConfigError("exponential_race over an empty vocabulary")
    check_stream(stream)
    out = torch.empty(rows, device=probs.device, dtype=torch.int64)
    if rows == 0:
        return out
    slices, scratch = slice_scratch(rows, vocab, BLOCK, probs.device)
    _race[(rows, slices)](probs, keys.contiguous(), counters.contiguous(), *scratch, out, arrivals(probs.device, rows),
                          vocab, probs.stride(0), STREAM=stream, STREAMS=STREAMS, BLOCK=BLOCK,
                          SLICES=triton.next_power_of_2(slices), num_warps=8)
    return out


__all__ = ["exponential_race"]
