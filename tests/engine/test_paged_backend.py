"""The engine runs the model's own blocks, plugging its paged cache and kernels in through the backend object:
each of its backends computes what the model's default backend computes on the same tokens."""

import pytest
import torch

from seekforge import LLM, SamplingParams
from seekforge.engine.model_runner import Chunk, ModelRunner
from seekforge.engine.paged_backend import DecodeBackend
from seekforge.model import ModelConfig, Transformer
from seekforge.model.mtp import MTPModule


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval()


def test_the_engine_runs_the_models_blocks_and_its_drafter(model):
    """Forward hooks on the model's blocks and on its MTP module fire while the engine decodes with drafts: the
    engine has no forward of its own."""
    called = set()
    handles = [m.register_forward_hook(lambda m, args, out: called.add(m))
               for m in [*model.layers, model.mtp[0]]]
    try:
        LLM(model, num_speculative_tokens=1, max_model_len=64).generate([[5, 9, 2, 7]], SamplingParams(max_tokens=4))
    finally:
        for h in handles:
            h.remove()
    assert called == {*model.layers, model.mtp[0]} and isinstance(model.mtp[0], MTPModule)


def test_prefill_and_decode_backends_compute_the_default_backends_blocks(model):
    """Every block of a fresh 9-token prefill (`StepBackend`: explicit attention over the chunk's own latents), then
    of the 10th token decoded over the cache (`DecodeBackend`: absorbed attention over the paged cache), against
    the block with the default backend (explicit, causal) over all 10 tokens: the same outputs and expert loads."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    runner = ModelRunner(model, num_blocks=4, block_size=4, max_model_len=16)
    table = [2, 0, 3]
    prefill = runner.prepare([Chunk(table, 0, tokens[0, :9].tolist())])
    decode = runner.prepare([Chunk(table, 9, tokens[0, 9:].tolist())])
    with torch.no_grad():
        cos, sin = model.rope(model.positions_like(tokens))
        h = model.embed(tokens)
        for i, block in enumerate(model.layers):  # each block from the same input
            want, routing = block(h, cos, sin)
            step = runner._backend(runner.kv_cache[i], prefill)
            got, routed = block(h[:, :9], cos[:, :9], sin[:, :9], None, step)
            torch.testing.assert_close(got, want[:, :9], atol=1e-5, rtol=1e-5)
            plain = DecodeBackend(runner.kv_cache[i], decode.slot_mapping, decode.groups[0].plan)
            got, routed_decode = block(h[:, 9:], cos[:, 9:], sin[:, 9:], None, plain)
            torch.testing.assert_close(got, want[:, 9:], atol=1e-5, rtol=1e-5)
            if routing is None:
                assert routed is None and routed_decode is None
            else:
                torch.testing.assert_close(routed[1] + routed_decode[1], routing.load)
            h = want
