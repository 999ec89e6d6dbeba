"""The counter-based draws of `seekforge.ops.rng` against the published SplitMix64 and a plain-integer reference of
the documented formula, and their statistics: uniform, an exact exponential race, no correlation between
neighbouring seeds, completions, counters, streams and columns."""

from __future__ import annotations

import math

import pytest
import torch

from seekforge import ops
from seekforge.ops.rng import STREAMS, exponential_race_reference, splitmix64

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64_int(state: int, n: int) -> int:
    """The n-th output of SplitMix64 (Steele et al. 2014) seeded with `state`, on Python integers."""
    z = (state + n * GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def uniform_int(key: int, counter: int, stream: int, column: int) -> float:
    """The module docstring's formula, on Python integers."""
    row = splitmix64_int(key & MASK, STREAMS * counter + stream + 1)
    return ((splitmix64_int(row, column + 1) >> 40) | 1) / 2**24


def signed(word: int) -> int:
    return word - (1 << 64) if word >> 63 else word


def test_splitmix64_gives_the_published_outputs():
    """Seed 1234567's first five outputs (Rosetta Code, "Pseudo-random numbers/Splitmix64"); int64 holds the bits."""
    published = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                 16408922859458223821]
    got = splitmix64(torch.tensor([1234567]), torch.arange(1, 6))
    assert got.tolist() == [signed(x) for x in published]
    assert [splitmix64_int(1234567, n) for n in range(1, 6)] == published


def test_uniforms_are_the_formula_exactly():
    """Keys across the whole int64 range, counters past 2^32, every stream, partial widths: bit for bit."""
    g = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.tensor([0, -1, -2**63, 2**63 - 1]), torch.randint(-2**63, 2**63 - 1, (4,), generator=g)])
    counters = torch.tensor([0, 1, 2**40 + 3, 7, 2**33, 5, 0, 123456])
    for stream in range(STREAMS):
        u = ops.uniform(keys, counters, stream, 37)
        assert u.dtype == torch.float32 and u.shape == (8, 37)
        ref = [[uniform_int(k, c, stream, j) for j in range(37)] for k, c in zip(keys.tolist(), counters.tolist())]
        assert u.tolist() == ref  # float32 holds each odd multiple of 2^-24 exactly
    assert 0 < u.min() and u.max() < 1


def test_a_rows_draws_do_not_depend_on_the_other_rows():
    keys, counters = torch.tensor([5, -9, 5]), torch.tensor([3, 3, 4])
    batch = ops.uniform(keys, counters, 0, 50)
    for i in range(3):
        assert torch.equal(ops.uniform(keys[i:i + 1], counters[i:i + 1], 0, 50)[0], batch[i])
    assert not torch.equal(batch[0], batch[2])  # the next token of one sequence draws anew


def test_sequence_keys():
    keys = ops.sequence_keys(7, 4)
    assert keys[:2] == ops.sequence_keys(7, 2) and len(set(keys)) == 4  # a completion's key ignores n
    assert ops.sequence_keys(-1, 2) == ops.sequence_keys(2**64 - 1, 2)  # seeds are taken mod 2^64
    first = splitmix64_int(7, 1)
    assert keys == [signed(splitmix64_int(first, i + 1)) for i in range(4)]


def ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample u from Uniform(0, 1)."""
    x = u.double().flatten().sort().values
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - x).max().item(), (x - (i - 1) / n).max().item())


def ks_bound(n: int, alpha: float = 1e-6) -> float:
    return math.sqrt(-math.log(alpha / 2) / (2 * n))  # the asymptotic critical value


def chi2_bound(dof: int) -> float:
    return dof + 6 * math.sqrt(2 * dof)  # about p < 1e-6


@pytest.mark.parametrize("layout", ["columns", "counters", "keys"])
def test_uniforms_are_uniform(layout):
    """Along a row's columns, along one sequence's counters (column 0), and across keys: KS and chi-square."""
    n = 2**17
    if layout == "columns":
        u = ops.uniform(torch.tensor([42]), torch.tensor([0]), 0, n)
    elif layout == "counters":
        u = ops.uniform(torch.full((n,), 42), torch.arange(n), 0, 1)
    else:
        u = ops.uniform(torch.tensor(ops.sequence_keys(3, n)), torch.zeros(n, dtype=torch.long), 0, 1)
    assert ks_statistic(u) < ks_bound(n)
    counts = torch.bincount((u.flatten() * 256).long(), minlength=256).double()
    expected = n / 256
    assert ((counts - expected) ** 2 / expected).sum() < chi2_bound(255)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def test_neighbours_are_not_correlated():
    """Adjacent seeds, completions of one request, counters, streams and columns: Pearson correlation within chance
    (|r| < 5 / sqrt(n)), and each of the uniform's 23 random bits agrees with its neighbour's half of the time."""
    n, rows = 2**15, 64
    keys = torch.tensor([ops.sequence_keys(s, 1)[0] for s in range(rows + 1)])  # seeds 0 .. rows
    zeros, steps = torch.zeros(rows, dtype=torch.long), torch.arange(rows)
    first, second = torch.tensor(ops.sequence_keys(9, 2)).split(1)
    row = ops.uniform(keys[:1], zeros[:1], 0, n + 1)[0]
    neighbours = {
        "seeds": (ops.uniform(keys[:-1], zeros, 0, n // rows), ops.uniform(keys[1:], zeros, 0, n // rows)),
        "completions": (ops.uniform(first, zeros[:1], 0, n), ops.uniform(second, zeros[:1], 0, n)),
        "counters": (ops.uniform(keys[:-1], steps, 0, n // rows), ops.uniform(keys[:-1], steps + 1, 0, n // rows)),
        "streams": (ops.uniform(keys[:-1], steps, 0, n // rows), ops.uniform(keys[:-1], steps, 1, n // rows)),
        "columns": (row[:-1], row[1:]),
    }
    for name, (a, b) in neighbours.items():
        assert abs(correlation(a, b)) < 5 / math.sqrt(n), name
        bits_a, bits_b = (a * 2**24).long() >> 1, (b * 2**24).long() >> 1
        agree = torch.stack([(bits_a >> i & 1) == (bits_b >> i & 1) for i in range(23)]).flatten(1).double().mean(1)
        assert (agree - 0.5).abs().max() < 5 * 0.5 / math.sqrt(n), name


def test_the_exponential_race_picks_each_index_with_its_probability():
    """argmax(p / E) over a known distribution (a zero included) and the same weights unnormalised, 2^17 draws of
    one sequence's successive tokens: frequencies within 5 standard errors, the zero never drawn."""
    n = 2**17
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    for weights in (p, 3 * p):
        tokens = exponential_race_reference(weights.expand(n, -1), torch.full((n,), 77), torch.arange(n), 0)
        freq = torch.bincount(tokens, minlength=6).double() / n
        assert freq[5] == 0
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), freq


def test_the_race_takes_the_kernel_or_the_reference_alike():
    """ops.exponential_race under the torch backend is the reference, whatever the rows' layout."""
    probs = torch.rand(4, 33).softmax(-1)
    keys, counters = torch.tensor([1, 2, 3, 4]), torch.tensor([9, 9, 9, 9])
    with ops.backend("torch"):
        got = ops.exponential_race(probs, keys, counters, 1)
    assert torch.equal(got, exponential_race_reference(probs, keys, counters, 1))
    assert torch.equal(ops.exponential_race(probs.t().contiguous().t(), keys, counters, 1), got)
