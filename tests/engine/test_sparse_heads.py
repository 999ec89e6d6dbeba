"""Dynamic sparse heads in the engine (`EngineConfig.sparse_heads`): its settings' checks, the decode backends'
attention against the naive per-head loop, every head kept as today's engine exactly, and the engine's greedy
tokens as the model's own sparse forward gives them."""

import copy

import pytest
import torch

from sparse_heads_reference import sparse_heads_attention
from seekforge import LLM, EngineConfig, SamplingParams
from seekforge.engine.model_runner import Chunk, ModelRunner
from seekforge.engine.paged_backend import DecodeBackend
from seekforge.errors import ConfigError
from seekforge.model import ModelConfig, Transformer
from seekforge.model.backend import Backend


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny").replace(n_mtp_modules=0)).eval()


@pytest.mark.parametrize("value", [-0.1, 1.0, 1, True, "0.3", None])
def test_bad_fractions_are_refused(value):
    with pytest.raises(ConfigError, match=r"sparse_heads is the fraction .* in \[0, 1\)"):
        EngineConfig(sparse_heads=value)


@pytest.mark.parametrize("fraction, heads, kept", [(0.0, 4, None), (0.25, 4, 3), (0.35, 4, 3), (0.5, 4, 2),
                                                   (0.75, 4, 1), (0.2, 16, 13), (0.35, 16, 10), (0.5, 128, 64)])
def test_the_fraction_sets_the_kept_heads(fraction, heads, kept):
    """The skipped heads are the fraction of the model's heads rounded to the nearest count."""
    assert EngineConfig(sparse_heads=fraction).kept_heads(heads) == kept


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_a_fraction_that_skips_no_head_or_every_head_is_refused(model, fraction):
    with pytest.raises(ConfigError, match=r"sparse_heads=0\.\d skips [04] of the model's 4 attention heads"):
        LLM(model, max_model_len=32, sparse_heads=fraction)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_decode_backends_attend_with_the_kept_heads_only(model, keep):
    """A 9-token prefill (every head), then the 10th token decoded over the paged cache with `keep` heads, by the
    plain decode step's backend and by the packed step's: MLA's attention equals the naive loop's for that token
    (explicit keys and values, the dropped heads zeroed)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    runner = ModelRunner(model, num_blocks=4, block_size=4, max_model_len=16, keep_heads=keep)
    table = [2, 0, 3]
    prefill = runner.prepare([Chunk(table, 0, tokens[0, :9].tolist())])
    decode = runner.prepare([Chunk(table, 9, tokens[0, 9:].tolist())])
    block = model.layers[0]
    with torch.no_grad():
        cos, sin = model.rope(model.positions_like(tokens))
        h = model.embed(tokens)
        want = sparse_heads_attention(block.attn, block.attn_norm(h), cos, sin, keep, context=9)
        runner._backend(runner.kv_cache[0], prefill).attend(block.attn, block.attn_norm, h[:, :9], cos[:, :9],
                                                            sin[:, :9])
        backends = [DecodeBackend(runner.kv_cache[0], decode.slot_mapping, decode.groups[0].plan, keep_heads=keep),
                    runner._backend(runner.kv_cache[0], decode)]
        for backend in backends:
            got = backend.attend(block.attn, block.attn_norm, h[:, 9:], cos[:, 9:], sin[:, 9:])
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_every_head_kept_is_todays_engine_bit_for_bit(model):
    """A runner told to keep every head (each decoded query choosing all of them, through the sparse path) computes
    exactly what today's runner does: a prefill and a decode step's logits equal bit for bit."""
    tokens = torch.randint(0, model.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = []
    for keep in (None, model.cfg.n_heads):
        runner = ModelRunner(model, num_blocks=4, block_size=4, max_model_len=16, keep_heads=keep)
        with torch.no_grad():
            steps = [runner.prepare([Chunk([1, 3, 0], 0, tokens[:11])]), runner.prepare([Chunk([1, 3, 0], 11,
                                                                                               tokens[11:])])]
            logits.append([runner.logits(runner.forward(step)[0]) for step in steps])
    assert all(torch.equal(a, b) for a, b in zip(*logits))


def test_greedy_tokens_are_the_models_sparse_forwards(model):
    """A one-token prompt runs through the absorbed path from its first step, so each token the engine decodes with
    sparse_heads=0.5 is the argmax of the model's own forward with 2 of 4 heads a query over the tokens so far;
    and they are not the dense engine's."""
    prompt, new = [7], 12
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    got = LLM(model, max_model_len=32, sparse_heads=0.5).generate([prompt], params)[0].token_ids
    dense = LLM(model, max_model_len=32).generate([prompt], params)[0].token_ids
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            tokens.append(model(torch.tensor([tokens]), backend=Backend(keep_heads=2))[0, -1].argmax().item())
    assert got == tokens[1:] and got != dense


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_token_by_token_decode_is_the_models_sparse_forward(model, device):
    """Ten tokens fed to the runner one step each (every step a decode step over the paged cache, the decode kernel
    where the device runs Triton) with 2 of 4 heads a query: each step's logits are the model's own sparse forward's
    at that position, in fp32."""
    model = copy.deepcopy(model).to(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(model, num_blocks=4, block_size=4, max_model_len=16, keep_heads=2)
    with torch.no_grad():
        want = model(torch.tensor([tokens], device=device), backend=Backend(keep_heads=2))[0]
        got = torch.cat([runner.logits(runner.forward(runner.prepare([Chunk([3, 1, 0], i, [t])]))[0])
                         for i, t in enumerate(tokens)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_with_sparse_heads_matches_eager_decode(compile):
    """bf16 on the GPU with CUDA graphs (and compiled blocks): a replayed decode step with sparse_heads=0.5 gives the
    eager step's logits, and the engine generates through the graphs."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(n_mtp_modules=0)).to("cuda", torch.bfloat16).eval()
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,)).tolist() for n in (5, 30, 17)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, max_num_seqs=4, max_model_len=64, cuda_graphs=True, compile=compile, sparse_heads=0.5)
    assert llm.runner.keep_heads == 2 and llm.runner.graphs
    for p in prompts:
        llm.add_request(p, params)
    llm.step()  # prefill: the cache now holds the prompts
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in llm.scheduler.running]
    with torch.inference_mode():
        replayed = llm.runner.decode_logits(chunks)[0].clone()
        eager = llm.runner.logits(llm.runner.forward(llm.runner.prepare(chunks))[0])
    tol = 0.06 if compile else 0.02
    torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
    while llm.has_unfinished_requests():
        llm.step()
    assert [len(o.token_ids) for o in llm.generate(prompts, params)] == [8, 8, 8]


def test_serve_flag_fills_the_engine_setting(tmp_path, monkeypatch, capsys):
    """`seekforge serve --sparse-heads F` sets EngineConfig.sparse_heads (off without it); a bad fraction is a
    usage error naming the setting."""
    import seekforge.server
    from seekforge.cli import main

    (tmp_path / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(seekforge.server, "serve", lambda config: seen.append(config.engine) or 0)
    assert main(["serve", str(tmp_path), "--sparse-heads", "0.25"]) == 0 and seen[0].sparse_heads == 0.25
    assert main(["serve", str(tmp_path)]) == 0 and seen[1].sparse_heads == 0.0
    assert main(["serve", str(tmp_path), "--sparse-heads", "1.5"]) == 2
    assert "sparse_heads is the fraction" in capsys.readouterr().err
