"""Many sequences at once against a plain generate loop: the engine's batched host paths (packed step inputs, the
sampling batch kept between steps, stop checks, finished requests) must give each sequence exactly the tokens and
text that generating it alone with the model's own forward gives.

The reference recomputes the whole sequence with `Transformer.forward` for every new token and draws a sampled
token as the engine's sampler documents it (seekforge.engine.sampler): the exponential race argmax(p / E), E = -log(u),
u the counter-based uniforms (seekforge.ops.uniform) of the sequence's key, the index of the token drawn and the
sampling stream, one row at a time. It stops at EOS, a stop token, a stop string (text cut before it) or max_tokens.
"""

from __future__ import annotations

import pytest
import torch

from seekforge import LLM, SamplingParams, ops
from seekforge.engine.sampler import SAMPLE
from seekforge.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(model: Transformer, tokenizer, prompt: list[int], params: SamplingParams, index: int = 0):
    """(token ids, text) of one completion generated alone, one full forward a token."""
    key = None if params.seed is None else torch.tensor([ops.sequence_keys(params.seed, index + 1)[index]])
    ids, out = list(prompt), []
    eos = {model.cfg.eos_token_id, tokenizer.eos_id}
    with torch.inference_mode():
        while True:
            logits = model(torch.tensor([ids]))[0, -1].float()
            if params.temperature == 0:
                tok = int(logits.argmax())
            else:
                probs = (logits / params.temperature).softmax(-1)
                u = ops.uniform(key, torch.tensor([len(ids)]), SAMPLE, len(probs))[0]
                tok = int((probs / -u.log()).argmax())
            ids.append(tok)
            out.append(tok)
            text = tokenizer.decode(out, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                return out, text[:min(hits)]
            if (tok in eos and not params.ignore_eos) or tok in params.stop_token_ids or len(out) >= params.max_tokens:
                return out, text


def mixed_requests(vocab: int, count: int):
    """Prompts of several lengths and a mix of parameters: greedy and seeded, stop tokens and strings, max_tokens."""
    g = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for i in range(count):
        prompts.append(torch.randint(3, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist())
        kind = i % 4
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=6 + i % 7, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=1.0, max_tokens=4 + i % 11, seed=i, ignore_eos=True)
        elif kind == 2:
            p = SamplingParams(temperature=0.8, max_tokens=14, seed=100 + i, stop=["1", "+"], ignore_eos=True)
        else:
            p = SamplingParams(temperature=1.0, max_tokens=12, seed=200 + i, stop_token_ids=list(range(3, vocab, 7)))
        params.append(p)
    return prompts, params


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("num_blocks", [None, 14], ids=["roomy", "preempting"])
def test_many_mixed_sequences_match_a_plain_generate_loop(tiny_checkpoint, task_tokenizer, async_scheduling,
                                                          num_blocks):
    path = tiny_checkpoint(n_mtp_modules=0)
    llm = LLM(path, block_size=4, num_blocks=num_blocks, max_num_seqs=16, max_num_batched_tokens=48,
              async_scheduling=async_scheduling)
    prompts, params = mixed_requests(llm.cfg.vocab_size, 24)
    outs = llm.generate(prompts, params)
    if num_blocks is not None:
        assert llm.stats()["preemptions"] > 0  # the small cache made the scheduler preempt and recompute
    expected = [reference(llm.model, task_tokenizer, p, sp) for p, sp in zip(prompts, params)]
    assert [(o.token_ids, o.text) for o in outs] == expected
    reasons = {o.finish_reason for o in outs}
    assert reasons == {"stop", "length"}  # both kinds of ending happened


def test_padded_tables_truncate_and_pad_each_row():
    from seekforge.engine.device_copy import padded_tables

    got = padded_tables([[5, 6, 7], [], [9], [1, 2, 3, 4, 8]], 4, -1)
    assert got.tolist() == [[5, 6, 7, -1], [-1, -1, -1, -1], [9, -1, -1, -1], [1, 2, 3, 4]]
    assert got.flags["C_CONTIGUOUS"]
    assert padded_tables([[3]], 0, -1).shape == (1, 0)


def test_decode_graphs_cover_every_batch_up_to_max_num_seqs():
    from seekforge.engine.model_runner import graph_sizes

    assert graph_sizes(1) == [1]
    assert graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graph_sizes(512) == [1, 2, 4, 8] + list(range(16, 257, 16)) + [320, 384, 448, 512]
    assert graph_sizes(300)[-2:] == [256, 300]


@pytest.mark.gpu
def test_cuda_graph_past_256_sequences_replays_the_eager_step(tiny_checkpoint):
    """300 sequences replay the graph of 320 (captured past the old cap of 256), with the eager step's logits, and
    generate through it with async scheduling as without."""
    from seekforge.engine.model_runner import Chunk

    path = tiny_checkpoint(n_mtp_modules=0)
    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=320, max_num_batched_tokens=8192,
              cuda_graphs=True)
    assert {size for _, size in llm.runner.graphs} >= {256, 320}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, llm.cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 20, (300,), generator=g)]
    full = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, full)
    while any(s.num_computed < s.num_prompt_tokens for s in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()
    seqs = llm.scheduler.running
    assert len(seqs) == 300
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in seqs]
    with torch.inference_mode():
        replayed = llm.runner.decode_logits(chunks)[0].clone()
        eager = llm.runner.logits(llm.runner.forward(llm.runner.prepare(chunks))[0])
    torch.testing.assert_close(replayed, eager, atol=0.02, rtol=0.02)
    while llm.has_unfinished_requests():
        llm.step()
    outs = {}
    for mode in (False, True):
        engine = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=320, max_num_batched_tokens=8192,
                     cuda_graphs=True, async_scheduling=mode)
        outs[mode] = [o.token_ids for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
        assert (engine.stats()["async_steps"] > 0) == mode
    assert outs[True] == outs[False]
