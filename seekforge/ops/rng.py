"""Counter-based random draws for sampling: every value a pure function of (key, counter, stream, column), so a batch
of rows draws in one vectorised op and a row's draws depend on nothing else in the batch.

The function is SplitMix64 (Steele, Lea and Flood 2014; the output function is Stafford's "variant 13" finaliser):
`splitmix64(state, n)`, the n-th output of SplitMix64 seeded with `state`, is mix(state + n * G) with G the golden
ratio's 64-bit increment. Nested three times:

    key(seed, index)                 = splitmix64(splitmix64(seed, 1), index + 1)   one completion of a request
    row(key, counter, stream)        = splitmix64(key, STREAMS * counter + stream + 1)
    bits(key, counter, stream, col)  = splitmix64(row, col + 1)
    uniform                          = ((bits >> 40) | 1) / 2^24                      the top 24 bits, the last set

The engine's counter is the index in its sequence of the token being drawn, and the stream tells apart the draws one
token needs (the sample, a speculative draft, the draft's acceptance). 64-bit lanes rather than 32: with a 32-bit
row value, two rows' column sequences would overlap (one shifted against the other) with probability about
vocab / 2^32 a pair of rows, i.e. every step at hundreds of rows and a 100k vocabulary.

Exact on every device: int64 tensors hold the 64-bit words, their products wrap mod 2^64 on the CPU and on CUDA alike
(and in Triton's uint64), the right shifts are made logical by masks, and the uniform is an odd multiple of 2^-24
below 1, which float32 holds exactly: never 0 or 1, so -log(u) is finite and positive. Only the exponential's log
is a float function, which each device's math library rounds within a few ulp: tokens agree across devices except
where two columns' p / E tie to within that.

`exponential_race` draws one token a row as argmax(p / E), E = -log(u) ~ Exp(1), which picks index i with
probability p_i / sum(p); where the backend takes Triton it is one launch that draws, divides and takes the argmax
(`seekforge.ops.triton.race`), and the PyTorch reference below otherwise.
"""

from __future__ import annotations

import torch

from seekforge.errors import ConfigError
from seekforge.ops.dispatch import TritonOp

STREAMS = 4  # streams per counter (0 .. STREAMS - 1)


def _int64(word: int) -> int:
    """A 64-bit word as the int64 that holds its bits."""
    word %= 1 << 64
    return word - (1 << 64) if word >> 63 else word


G = _int64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, None))  # shift, then multiply


def check_stream(stream: int) -> None:
    if not 0 <= stream < STREAMS:
        raise ConfigError(f"a draw's stream must be in [0, {STREAMS}), got {stream}")


def splitmix64(state: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """The n-th output (n >= 1) of SplitMix64 seeded with `state`, elementwise over broadcast int64 tensors."""
    z = state + n * G  # a new tensor, mixed in place below
    t = torch.empty_like(z)
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(z, shift, out=t)
        z ^= t.bitwise_and_((1 << 64 - shift) - 1)  # the mask makes int64's arithmetic shift logical
        if multiplier is not None:
            z *= multiplier
    return z


def sequence_keys(seed: int, n: int) -> list[int]:
    """The keys of a request's n completions under `seed` (any integer; seeds equal mod 2^64 are one)."""
    seeded = splitmix64(torch.tensor(_int64(seed)), 1)
    return splitmix64(seeded, torch.arange(1, n + 1)).tolist()


def uniform(keys: torch.Tensor, counters: torch.Tensor, stream: int, width: int) -> torch.Tensor:
    """keys, counters [R] int64 -> [R, width] float32 uniforms in (0, 1), column c of row r the draw of
    (keys[r], counters[r], stream, c)."""
    check_stream(stream)
    rows = splitmix64(keys, counters * STREAMS + (stream + 1))
    bits = splitmix64(rows.unsqueeze(1), torch.arange(1, width + 1, device=keys.device))
    return bits.bitwise_right_shift_(40).bitwise_and_(0xFFFFFF).bitwise_or_(1).float().mul_(2.0 ** -24)


def _load():
    from seekforge.ops.triton import race

    return race


RACE = TritonOp("race", _load)


def exponential_race(probs: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor, stream: int) -> torch.Tensor:
    """probs [R, V] (non-negative weights, not necessarily normalised), keys and counters [R] int64 -> [R] int64:
    each row's argmax of probs / E, E the exponentials -log(uniform(keys, counters, stream, V))."""
    kernel = RACE.on(probs.device)
    if (kernel is not None and probs.dim() == 2 and probs.shape[1] and probs.dtype == torch.float32
            and probs.stride(-1) == 1):
        return kernel.exponential_race(probs, keys, counters, stream)
    return exponential_race_reference(probs, keys, counters, stream)


def exponential_race_reference(probs, keys, counters, stream: int) -> torch.Tensor:
    """exponential_race in PyTorch: the draws as a [R, V] tensor, then the argmax."""
    exponentials = uniform(keys, counters, stream, probs.shape[-1]).log_().neg_()
    return (probs / exponentials).argmax(dim=-1)
