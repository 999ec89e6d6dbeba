"""The Triton argmax of greedy decoding (`seekforge.ops.triton.argmax`) against torch.argmax.

Without CUDA the kernel runs under Triton's interpreter (tests/triton_setup.py).
"""

import pytest
import torch
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops.triton import argmax as argmax_module  # noqa: E402
from seekforge.ops.triton.argmax import argmax  # noqa: E402


@pytest.mark.parametrize("rows,vocab,block", [(1, 1000, 128), (3, 517, 64), (2, 64, 64), (1, 5, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_first_index_of_each_rows_maximum(rows, vocab, block, dtype, monkeypatch):
    """Rows over several slices (the last one partial), ties across and within slices (the first wins), a row
    of -inf (index 0, as torch gives)."""
    monkeypatch.setattr(argmax_module, "BLOCK", block)
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g).to(DEVICE, dtype)
    top = x.max().item() + 1
    x[0, vocab // 3] = x[0, vocab - 1] = x[0, vocab // 2] = top  # three-way tie in row 0
    if rows > 1:
        x[1] = float("-inf")
    torch.testing.assert_close(argmax(x), x.argmax(dim=-1), atol=0, rtol=0)
    sub = x[:, : vocab - 1]  # rows vocab apart
    torch.testing.assert_close(argmax(sub), sub.argmax(dim=-1), atol=0, rtol=0)


def test_repeated_calls_reset_their_counters():
    x = torch.randn(2, 300, device=DEVICE)
    for shift in range(3):
        y = x.roll(shift * 7, dims=1)
        torch.testing.assert_close(argmax(y), y.argmax(dim=-1), atol=0, rtol=0)


def test_bad_input_names_the_problem():
    with pytest.raises(ConfigError, match="rows, vocab"):
        argmax(torch.randn(4, device=DEVICE))
    with pytest.raises(ConfigError, match="empty vocabulary"):
        argmax(torch.randn(2, 0, device=DEVICE))
    assert argmax(torch.randn(0, 8, device=DEVICE)).shape == (0,)


def test_the_sampler_takes_it_where_triton_runs(monkeypatch):
    from seekforge.engine.sampler import Row, make_batch, sample
    from seekforge.engine.sampling_params import SamplingParams

    calls = []  # a spy on the kernel the op calls
    monkeypatch.setattr(argmax_module, "argmax", lambda x, out: calls.append(x) or argmax(x, out))
    logits = torch.randn(2, 50, device=DEVICE)
    batch = make_batch([Row(SamplingParams(temperature=0), None)] * 2, 50, logits.device)
    with ops.backend("torch"):
        tokens, _ = sample(logits, batch, [3, 3])  # greedy rows: their counters are never read
    assert not calls and tokens.tolist() == logits.argmax(dim=-1).tolist()
    with ops.backend("triton"):
        tokens, _ = sample(logits, batch, [3, 3])  # greedy rows: their counters are never read
        assert calls and tokens.tolist() == logits.argmax(dim=-1).tolist()
        out = torch.full((2,), -1, dtype=torch.long, device=DEVICE)
        assert sample(logits, batch, [3, 3], out=out)[0] is out and out.tolist() == tokens.tolist()


def test_it_writes_into_a_given_tensor():
    x = torch.randn(3, 70, device=DEVICE)
    out = torch.full((5,), -1, dtype=torch.long, device=DEVICE)
    assert argmax(x, out[1:4]).data_ptr() == out[1:].data_ptr()
    assert out.tolist() == [-1, *x.argmax(dim=-1).tolist(), -1]
    with pytest.raises(ConfigError, match="writes \\[3\\] int64"):
        argmax(x, torch.empty(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ConfigError, match="strides"):
        argmax(x, out[::2])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the 16b vocabulary on the GPU")
def test_16b_vocabulary_many_launches():
    x = torch.empty(4, 102400, device=DEVICE)
    for seed in range(50):
        x.normal_(generator=torch.Generator(DEVICE).manual_seed(seed))
        torch.testing.assert_close(argmax(x[: 1 + seed % 4]), x[: 1 + seed % 4].argmax(dim=-1), atol=0, rtol=0)


def test_the_engine_samples_with_the_kernels_it_was_given_whatever_encloses_it(monkeypatch):
    """LLM(kernels="torch") steps with torch's argmax inside a `backend("triton")`; LLM(kernels="triton") on the
    CPU is refused without the interpreter."""
    from seekforge import LLM, SamplingParams
    from seekforge.model import ModelConfig, Transformer

    cfg = ModelConfig.preset("tiny").replace(n_layers=1, n_mtp_modules=0)
    llm = LLM(Transformer(cfg).eval(), kernels="torch", max_num_seqs=1, max_model_len=32)
    calls = []
    monkeypatch.setattr(argmax_module, "argmax", lambda x, out=None: calls.append(x) or argmax(x, out))
    with ops.backend("triton"):
        got = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=2))[0].token_ids
    assert not calls and len(got) == 2
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            LLM(Transformer(cfg).eval(), kernels="triton", max_num_seqs=1, max_model_len=32)
