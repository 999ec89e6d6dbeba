"""The Triton exponential race (`seekforge.ops.triton.race`) against its PyTorch reference
(`seekforge.ops.rng.exponential_race_reference`), and the sampler's use of it.

Without CUDA the kernel runs under Triton's interpreter (tests/triton_setup.py).
"""

import pytest
import torch
from triton_setup import CUDA, DEVICE, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops.rng import exponential_race_reference  # noqa: E402
from seekforge.ops.triton import race as race_module  # noqa: E402
from seekforge.ops.triton.race import exponential_race  # noqa: E402


def inputs(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(rows, vocab, generator=g) * 2).softmax(-1)
    keys = torch.randint(-2**63, 2**63 - 1, (rows,), generator=g)
    counters = torch.randint(0, 2**40, (rows,), generator=g)
    return probs.to(DEVICE), keys.to(DEVICE), counters.to(DEVICE)


@pytest.mark.parametrize("rows,vocab,block", [(1, 1000, 128), (5, 517, 64), (3, 64, 64), (2, 5, 4096)])
def test_the_kernel_draws_the_references_tokens(rows, vocab, block, monkeypatch):
    """Rows over several slices (the last one partial), every stream, a zero-probability column, and weights that
    are not normalised (speculative decoding's residuals)."""
    monkeypatch.setattr(race_module, "BLOCK", block)
    probs, keys, counters = inputs(rows, vocab, seed=vocab)
    probs[:, 0] = 0
    for stream in range(4):
        for weights in (probs, 3 * probs):
            got = exponential_race(weights, keys, counters, stream)
            torch.testing.assert_close(got, exponential_race_reference(weights, keys, counters, stream), atol=0, rtol=0)
    assert (exponential_race(probs, keys, counters, 0) != 0).all()


def test_many_draws_agree_with_the_reference():
    """1024 successive tokens of 4 sequences over a peaked distribution: any bit of the draws that differed would
    show as a different token somewhere."""
    probs, keys, _ = inputs(4, 300)
    probs = probs.repeat_interleave(256, 0)
    keys = keys.repeat_interleave(256)
    counters = torch.arange(256, device=DEVICE).repeat(4)
    torch.testing.assert_close(exponential_race(probs, keys, counters, 0),
                               exponential_race_reference(probs, keys, counters, 0), atol=0, rtol=0)


def test_bad_input_names_the_problem():
    probs, keys, counters = inputs(2, 10)
    with pytest.raises(ConfigError, match="float32 probabilities"):
        exponential_race(probs.half(), keys, counters, 0)
    with pytest.raises(ConfigError, match="counters \\[2\\] int64"):
        exponential_race(probs, keys, counters.int(), 0)
    with pytest.raises(ConfigError, match="stream must be in"):
        exponential_race(probs, keys, counters, 4)
    with pytest.raises(ConfigError, match="stream must be in"):
        ops.uniform(keys, counters, -1, 3)
    with pytest.raises(ConfigError, match="empty vocabulary"):
        exponential_race(probs[:, :0], keys, counters, 0)
    assert exponential_race(probs[:0], keys[:0], counters[:0], 0).shape == (0,)


def test_the_sampler_takes_it_where_triton_runs(monkeypatch):
    from seekforge.engine.sampler import Row, make_batch, sample
    from seekforge.engine.sampling_params import SamplingParams

    calls = []  # a spy on the kernel the op calls
    monkeypatch.setattr(race_module, "exponential_race", lambda *a: calls.append(a) or exponential_race(*a))
    logits = torch.randn(3, 50, device=DEVICE)
    seeded = SamplingParams(temperature=1.0, seed=1)
    batch = make_batch([Row(seeded, 11), Row(seeded, 12), Row(SamplingParams(temperature=0), None)], 50, DEVICE)
    with ops.backend("torch"):
        expected, _ = sample(logits, batch, [4, 4, 4])
    assert not calls
    with ops.backend("triton"):
        tokens, _ = sample(logits, batch, [4, 4, 4])
    assert calls and tokens.tolist() == expected.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA against the CPU")
def test_cuda_draws_what_the_cpu_draws():
    """The uniforms bit for bit, and the race's tokens (kernel and reference) for the same keys and probabilities."""
    probs, keys, counters = inputs(64, 102400)
    cpu = [t.cpu() for t in (probs, keys, counters)]
    assert torch.equal(ops.uniform(keys, counters, 2, 4096).cpu(), ops.uniform(*cpu[1:], 2, 4096))
    expected = exponential_race_reference(*cpu, 0)
    assert torch.equal(exponential_race(probs, keys, counters, 0).cpu(), expected)
    assert torch.equal(exponential_race_reference(probs, keys, counters, 0).cpu(), expected)
