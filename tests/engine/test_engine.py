"""The inference engine against transformers' greedy `generate`, and its scheduling, caching and API.

References are random tiny checkpoints written by transformers itself (tests/hf_reference.py); every
way of running the same prompts (batched, one by one, chunked, preempted, from the prefix cache) must
give transformers' tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from hf_reference import save_hf
from seekforge import LLM, SamplingParams, ops
from seekforge.engine import QueueFullError
from seekforge.engine.block_manager import BlockManager
from seekforge.engine.sequence import PENDING, Request, Sequence
from seekforge.errors import ConfigError
from seekforge.model import ModelConfig, Transformer

NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW)
FULL = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)  # always NEW tokens: predictable cache use


# transformers writes num_nextn_predict_layers but no MTP weights; the loader says so, rightly
pytestmark = [pytest.mark.filterwarnings("ignore:config.json declares"), pytest.mark.usefixtures("one_thread")]


def make_prompts(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, new=NEW, stop_at_eos=True):
    """transformers' greedy continuation: cut after the first EOS as the engine stops there, or (for
    ignore_eos) all `new` tokens, with an EOS id that never occurs so that nothing is stopped or masked."""
    kwargs = {} if stop_at_eos else {"eos_token_id": 10**6}
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, **kwargs)
    out = out[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    return out[:out.index(eos) + 1] if stop_at_eos and eos in out else out


@pytest.fixture(scope="module", params=["v3_sigmoid_grouped_qlora", "v2_softmax_greedy", "v3_yarn_two_dense"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf(request.param, path)
    prompts = make_prompts([1, 5, 19, 42])
    return path, prompts, [hf_greedy(hf, p, stop_at_eos=False) for p in prompts]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_matches_transformers_batched_and_one_by_one(checkpoint, async_scheduling):
    path, prompts, ref = checkpoint
    llm = LLM(path, block_size=4, async_scheduling=async_scheduling)
    assert [o.token_ids for o in llm.generate(prompts, FULL)] == ref
    assert (llm.stats()["async_steps"] > 0) == async_scheduling
    solo = LLM(path, block_size=4, enable_prefix_caching=False, async_scheduling=async_scheduling)
    assert [solo.generate(p, FULL)[0].token_ids for p in prompts] == ref


def test_compiled_blocks_match_transformers(checkpoint):
    """compile=True runs prefill and mixed steps through compiled blocks (decode graphs need CUDA)."""
    path, prompts, ref = checkpoint
    if "yarn" not in str(path):  # one checkpoint is enough to cover the compiled path; compiling takes a while
        pytest.skip("covered by the yarn checkpoint")
    llm = LLM(path, block_size=4, max_num_batched_tokens=7, compile=True)
    assert [o.token_ids for o in llm.generate(prompts, FULL)] == ref


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_chunked_prefill_preemption_and_prefix_hits_leave_outputs_unchanged(checkpoint, async_scheduling):
    path, prompts, ref = checkpoint
    # 7-token budget: every prompt but the shortest is prefilled in chunks while others decode
    chunked = LLM(path, block_size=4, max_num_batched_tokens=7, async_scheduling=async_scheduling)
    assert [o.token_ids for o in chunked.generate(prompts, FULL)] == ref
    # the second run takes every full prompt block from the prefix cache
    again = chunked.generate(prompts, FULL)
    assert [o.token_ids for o in again] == ref
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 4 * 4 for p in prompts]
    # 15 blocks of 4 slots hold the longest sequence alone, not the four at once (5 + 6 + 9 + 15 blocks)
    tight = LLM(path, block_size=4, num_blocks=15, async_scheduling=async_scheduling)
    assert [o.token_ids for o in tight.generate(prompts, FULL)] == ref
    assert tight.stats()["preemptions"] > 0


def test_shared_prefix_hits_and_n_completions(tmp_path):
    hf = save_hf("v3_no_groups_plain_q", tmp_path)
    stem = make_prompts([20], seed=3)[0]
    prompts = [stem + tail for tail in make_prompts([3, 6, 1], seed=4)]
    ref = [hf_greedy(hf, p) for p in prompts]
    llm = LLM(tmp_path, block_size=8)
    first = llm.generate(prompts[0], GREEDY)[0]
    rest = llm.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + [o.token_ids for o in rest] == ref
    assert first.num_cached_tokens == 0 and [o.num_cached_tokens for o in rest] == [16, 16]
    # n greedy completions of one prompt: the later ones share the first one's prompt blocks
    out = llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=NEW, n=3))[0]
    assert [c.token_ids for c in out.outputs] == [ref[1]] * 3


def test_live_model_is_used_in_place_and_weight_updates_are_seen(tmp_path):
    import seekforge

    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    model = seekforge.from_pretrained(tmp_path)
    ptrs = [p.data_ptr() for p in model.parameters()]
    llm = LLM(model, block_size=4)
    assert llm.model is model and [p.data_ptr() for p in model.parameters()] == ptrs
    prompt = make_prompts([30])[0]
    before = llm.generate(prompt, GREEDY)[0]
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 28  # cached while the weights stand still
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        for p in model.parameters():
            p.mul_(1.3)
    after = llm.generate(prompt, GREEDY)[0]
    assert after.num_cached_tokens == 0  # the version counters moved: the prefix cache was dropped
    fresh = LLM(seekforge.from_pretrained(tmp_path), block_size=4)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.mul_(1.3)
    assert after.token_ids == fresh.generate(prompt, GREEDY)[0].token_ids != before.token_ids
    llm.reset_prefix_cache()
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_graph_step_reads_its_inputs_from_the_static_buffer(tmp_path, compile, monkeypatch):
    """What a captured decode graph runs (`_graph_step` over the one static input buffer, padded to the
    graph's size), run on the CPU, equals the packed forward of the same decode step. Compiled, each block
    is one graph: the cache kernels are opaque ops (a graph break there cut the block into pieces), and the
    modules' float constants (norm eps, route scale) are baked in: left to dynamic shapes they become CPU
    scalar tensors, graph inputs that put CPU kernels into a GPU block."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    from seekforge.engine.model_runner import Chunk, DeviceIds

    graph_inputs, torch_compile = [], torch.compile

    def recording(gm, example_inputs):
        graph_inputs.extend(example_inputs)
        return compile_fx(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch_compile(fn, backend=recording, **kw))
    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    counters.clear()
    llm = LLM(tmp_path, block_size=4, max_num_seqs=8, compile=compile)
    for p in make_prompts([5, 30, 17]):
        llm.add_request(p, FULL)
    llm.step()  # prefill: the cache now holds the prompts
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in llm.scheduler.running]
    runner = llm.runner
    with torch.inference_mode():
        runner._allocate_static(8)
        runner._fill_static(chunks, 4)  # three sequences and one padding row
        from_buffer, graph_loads = runner._graph_step(4)[:2]
        from_buffer = from_buffer[:3]
        packed, packed_loads = runner.forward(runner.prepare(chunks))
        packed = runner.logits(packed)
        # tokens not yet on the host (async scheduling): the step reads them from the token buffer, by row
        buffer, rows = runner.token_buffer(8), [5, 0, 2]
        buffer[rows] = torch.tensor([ch.token_ids[0] for ch in chunks])
        pending = [Chunk(ch.block_table, ch.start, [PENDING]) for ch in chunks]
        runner._fill_static(pending, 4, DeviceIds([0, 1, 2], rows, buffer))
        from_device = runner._graph_step(4)[0][:3]
    torch.testing.assert_close(from_buffer, packed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_device, from_buffer, atol=0, rtol=0)
    # the padding row is routed too, but is no token of the step: the load counts the three sequences'
    assert {k: v.tolist() for k, v in graph_loads.items()} == {k: v.tolist() for k, v in packed_loads.items()}
    assert all(load.sum() == 3 * llm.cfg.n_activated_experts for load in graph_loads.values())
    assert not counters["graph_break"]
    assert (len(graph_inputs) > 0) == compile
    assert not [t for t in graph_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.float64]


@pytest.mark.parametrize("speculative", [0, 1], ids=["plain", "mtp-drafts"])
def test_each_step_reports_the_expert_load_of_its_forward(speculative):
    """`LLM.expert_load` after a step: per main MoE layer, the tokens the gates routed to each expert in that
    step's forward (counted by hooks on the gates), through chunked prefill, decode and draft verification; the
    MTP drafter's routing is not part of it, and a step without a forward reports none."""
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    chosen = {}
    for block in model.layers:
        if block.layer_id >= cfg.n_dense_layers:
            def count(gate, args, out, layer=block.layer_id):
                chosen[layer] = chosen.get(layer, 0) + torch.bincount(out[1].flatten(), minlength=gate.bias.numel())
            block.ffn.gate.register_forward_hook(count)
    llm = LLM(model, max_num_batched_tokens=16, num_speculative_tokens=speculative, max_model_len=128)
    for p in make_prompts([5, 30, 12]):
        llm.add_request(p, FULL)
    steps = 0
    while llm.has_unfinished_requests():
        chosen.clear()
        llm.step()
        steps += 1
        assert {k: v.tolist() for k, v in llm.expert_load.items()} == {k: v.tolist() for k, v in chosen.items()}
    assert steps > 3


def test_reference_decode_keeps_bf16_scores_in_fp32():
    """The PyTorch absorbed decode over the paged cache (what runs where the Triton kernel does not) in bf16,
    against itself in fp64 on the same bf16 inputs, scores of a few tens: each output within 1% (bf16 rounds the
    probabilities and the output). Scores rounded to bf16 before the softmax were off by up to 3.1%."""
    g = torch.Generator().manual_seed(0)
    c, block_size, context = 48, 8, 40
    cache = (torch.randn(6, block_size, c + 16, generator=g) * 2).bfloat16()
    q = (torch.randn(2, 1, 4, c + 16, generator=g) * 2).bfloat16()
    plan = ops.plan_paged_attention(torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]]),
                                    torch.tensor([[context - 1], [context - 3]]), block_size, context)
    want = ops.paged_mla_decode_reference(q.double(), cache.double(), plan, 1.0, c)
    got = ops.paged_mla_decode_reference(q, cache, plan, 1.0, c)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_attention_with_narrow_values_padded_or_not(device, masked):
    """MLA's values are narrower than its keys; padded or not (as `values_padded_for_sdpa` picks per device),
    prefill's attention is plain softmax attention."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 9, 3, 24, generator=g) for _ in range(2))
    v = torch.randn(2, 9, 3, 16, generator=g)
    mask = torch.rand(2, 9, 9, generator=g) < 0.7 if masked else torch.ones(9, 9, dtype=torch.bool).tril()
    mask |= torch.eye(9, dtype=torch.bool)  # every query sees something
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 0.3
    want = torch.einsum("bhst,bthd->bshd", scores.masked_fill(~mask.unsqueeze(-3), float("-inf")).softmax(-1), v)
    args = [x.to(device) for x in (q, k, v)] + [mask.to(device) if masked else None, 0.3]
    for pad in (True, False):
        got = ops.dense_attention(*args, pad_values=pad)
        assert got.shape == (2, 9, 3, 16)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    assert ops.values_padded_for_sdpa(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_latent_and_rotary_key_only(dtype):
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).to(dtype)
    llm = LLM(model, block_size=16, num_blocks=10)
    elsize = torch.tensor([], dtype=dtype).element_size()
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elsize * cfg.n_layers
    assert llm.cache_bytes_per_token == cfg.cache_bytes_per_token(elsize) == expected
    cache = llm.runner.kv_cache  # the blocks plus one scratch block for padding
    assert cache.dtype == dtype and cache.numel() * cache.element_size() == expected * 11 * 16
    stats = llm.stats()
    assert stats["full_kv_bytes_per_token"] == cfg.full_kv_bytes_per_token(elsize) > expected


def test_bad_requests_fail_before_any_work_and_never_disturb_others(tmp_path):
    hf = save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    llm = LLM(tmp_path, block_size=4, max_model_len=64)
    good = make_prompts([7, 12])
    bad = [
        ([], GREEDY, "empty prompt"),
        ("hello", GREEDY, "no tokenizer"),
        ([5] * 64, GREEDY, "context holds 64"),
        ([5, 96], GREEDY, "outside the vocabulary"),
        ([5, -1], GREEDY, "outside the vocabulary"),
    ]
    for prompt, params, message in bad:
        with pytest.raises(ConfigError, match=message):
            llm.generate([good[0], prompt], params)
        assert not llm.has_unfinished_requests()  # the good prompt was not started either
    for kwargs, message in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"),
                            (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n must")]:
        with pytest.raises(ConfigError, match=message):
            SamplingParams(**kwargs)
    # requests already queued keep going when a bad one is refused
    ids = [llm.add_request(p, GREEDY) for p in good]
    with pytest.raises(ConfigError):
        llm.add_request([5, 1000], GREEDY)
    outs = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outs[out.request_id] = out.token_ids
    assert [outs[i] for i in ids] == [hf_greedy(hf, p) for p in good]


def test_waiting_queue_is_bounded_and_generate_feeds_it(tmp_path):
    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    llm = LLM(tmp_path, block_size=4, max_waiting=2)
    prompts = make_prompts([3, 4, 5, 6, 7])
    llm.add_request(prompts[0], GREEDY)
    llm.add_request(prompts[1], GREEDY)
    with pytest.raises(QueueFullError):
        llm.add_request(prompts[2], GREEDY)
    while llm.has_unfinished_requests():
        llm.step()
    outs = llm.generate(prompts, GREEDY)
    assert len(outs) == 5 and all(o.finished and len(o.token_ids) > 0 for o in outs)
    solo = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert [o.token_ids for o in outs] == solo


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_streaming_deltas_add_up_and_abort(tmp_path, async_scheduling):
    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    llm = LLM(tmp_path, block_size=4, async_scheduling=async_scheduling)
    prompts = make_prompts([4, 9])
    final = llm.generate(prompts, GREEDY)
    seen = {}
    for out in llm.stream(prompts, GREEDY):
        seen.setdefault(out.request_id, []).extend(out.outputs[0].delta_token_ids)
        if out.finished:
            assert seen[out.request_id] == out.token_ids
    assert sorted(seen.values()) == sorted(o.token_ids for o in final)
    rid = llm.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    llm.step()
    llm.abort(rid)
    assert not llm.has_unfinished_requests() and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_async_scheduling_equals_sync_through_stops_seeds_and_aborts():
    """Async steps launch before the host knows the last step's tokens: sequences that stop on a token meanwhile
    drop the token computed for them, seeded samples follow the same streams, and no output shows a token
    the host does not know yet."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(n_mtp_modules=0, init_std=0.1)).eval()
    prompts = make_prompts([5, 30, 17, 3])
    stops = list(range(2, 60, 3))  # stop tokens: sequences end at different steps
    cases = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=stops),
             SamplingParams(temperature=1.0, max_tokens=20, seed=7, n=3, stop_token_ids=stops),
             SamplingParams(temperature=1.0, top_p=0.9, max_tokens=9, seed=1, ignore_eos=True)]
    for params in cases:
        sync = LLM(model, block_size=4, async_scheduling=False).generate(prompts, params)
        llm = LLM(model, block_size=4, async_scheduling=True)
        outs = llm.generate(prompts, params)
        key = [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in sync]
        assert [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs] == key
        assert llm.stats()["async_steps"] > 0
        assert {c.finish_reason for o in outs for c in o.outputs} >= ({"stop", "length"} if params.stop_token_ids
                                                                       else {"length"})
        streamed = {}
        for out in llm.stream(prompts, params):
            for c in out.outputs:
                assert PENDING not in c.delta_token_ids
                streamed.setdefault((out.request_id, c.index), []).extend(c.delta_token_ids)
        assert sorted(streamed.values()) == sorted(c.token_ids for o in sync for c in o.outputs)
    rid = llm.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    llm.step(), llm.step(), llm.step()  # a prefill, then steps in flight
    llm.abort(rid)
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_block_manager_hash_chain_refcounts_and_lru_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)

    def seq(i, tokens):
        return Sequence(i, Request(str(i), None, tokens, GREEDY), 0, None)

    a = seq(0, [1, 2, 3, 4, 5])
    assert bm.match_prefix(a) == []
    bm.allocate(a, [], 5)
    a.num_computed = 5
    bm.register(a)
    assert a.num_hashed_blocks == 2
    b = seq(1, [1, 2, 3, 4, 9])  # same first two blocks
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.match_prefix(seq(2, [9, 9, 3, 4, 5])) == []  # same block, different history: no hit
    assert bm.match_prefix(seq(3, [1, 2, 3, 4])) == a.block_table[:1]  # never the whole sequence
    bm.allocate(b, hits, 5)
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2] and b.num_computed == 4
    tables = a.block_table[:], b.block_table[:]
    bm.free_seq(a)
    bm.free_seq(b)
    a.block_table, b.block_table = tables  # kept only to name the blocks below
    assert bm.num_free_blocks == 4
    # freed cached blocks stay revivable until allocation reaches them; the tail goes first
    assert list(bm.free) == [a.block_table[2], b.block_table[2], hits[1], hits[0]]
    c = seq(4, [7] * 5)
    bm.allocate(c, [], 5)  # takes three blocks from the front: hits[1] is evicted, hits[0] survives
    assert bm.match_prefix(b) == hits[:1]
    bm.reset_prefix_cache()
    assert bm.match_prefix(b) == []


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, None])  # None: the CUDA default (64), the kernel's one-block tiles
def test_cuda_engine_matches_transformers(checkpoint, block_size):
    path, prompts, ref = checkpoint
    llm = LLM(path, device="cuda", dtype="float32", block_size=block_size)
    assert [o.token_ids for o in llm.generate(prompts, FULL)] == ref
    assert [llm.generate(p, FULL)[0].token_ids for p in prompts] == ref


@pytest.mark.gpu
def test_cuda_async_scheduling_equals_sync_under_graphs(tmp_path):
    """On the GPU async steps overlap for real: graph replays fed from the device, pinned copies, events."""
    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    prompts = make_prompts([5, 30, 17, 3, 9])
    stops = list(range(2, 90, 4))
    runs = {}
    for mode in (False, True):
        llm = LLM(tmp_path, device="cuda", dtype="bfloat16", max_num_seqs=8, cuda_graphs=True, async_scheduling=mode)
        runs[mode] = [[(c.token_ids, c.finish_reason) for c in o.outputs] for params in (
            SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stops),
            SamplingParams(temperature=1.0, max_tokens=24, seed=3, n=2, ignore_eos=True))
            for o in llm.generate(prompts, params)]
        assert (llm.stats()["async_steps"] > 0) == mode
    assert runs[True] == runs[False]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size, compile", [(16, False), (None, False), (None, True)])
def test_cuda_graph_replay_matches_eager_decode(tmp_path, block_size, compile):
    from seekforge.engine.model_runner import Chunk

    save_hf("v3_sigmoid_grouped_qlora", tmp_path)
    llm = LLM(tmp_path, device="cuda", dtype="bfloat16", block_size=block_size, max_num_seqs=8, cuda_graphs=True,
              compile=compile)
    assert sorted(size for k, size in llm.runner.graphs if k is None) == [1, 2, 4, 8] and len(llm.runner.graphs) == 4
    for p in make_prompts([5, 30, 17]):
        llm.add_request(p, FULL)
    llm.step()  # prefill: the cache now holds the prompts
    seqs = llm.scheduler.running
    for batch in (seqs[:1], seqs):  # padded to graphs of 1 and 4
        chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in batch]
        with torch.inference_mode():
            replayed, loads = llm.runner.decode_logits(chunks)
            replayed, loads = replayed.clone(), {layer: load.clone() for layer, load in loads.items()}
            stored = llm.runner.kv_cache.clone()
            eager = llm.runner.logits(llm.runner.forward(llm.runner.prepare(chunks))[0])
        # the graph's padding rows (3 sequences in the graph of 4) are no routed tokens
        moe_layers = list(range(llm.cfg.n_dense_layers, llm.cfg.n_layers))
        assert list(loads) == moe_layers
        assert all(load.sum().item() == len(batch) * llm.cfg.n_activated_experts for load in loads.values())
        # compiled kernels keep fp32 inside fused bf16 ops, so they round differently from eager ones
        tol = 0.06 if compile else 0.02
        torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
        # the replay wrote each new latent where the eager step writes it (the static rows' slot column, strided)
        torch.testing.assert_close(stored, llm.runner.kv_cache, atol=tol, rtol=tol)
    while llm.has_unfinished_requests():
        llm.step()
    outs = llm.generate(make_prompts([3, 9, 40, 2, 11]), FULL)
    assert all(len(o.token_ids) == NEW for o in outs)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_are_captured_per_routed_topk(tmp_path, compile):
    """With adaptive experts, every batch size is captured at each k of the levels, and a replay at k routes each
    token to k experts and matches the eager step at that k (never a graph captured at another k)."""
    from seekforge.engine.model_runner import Chunk

    save_hf("v3_sigmoid_grouped_qlora", tmp_path, num_experts_per_tok=3)  # levels 3, 2, 1
    llm = LLM(tmp_path, device="cuda", dtype="bfloat16", max_num_seqs=4, cuda_graphs=True, compile=compile,
              adaptive_experts=True)
    assert set(llm.runner.graphs) == {(k, s) for k in (None, 2, 1) for s in (1, 2, 4)}
    for p in make_prompts([5, 30, 17]):
        llm.add_request(p, FULL)
    llm.step()
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in llm.scheduler.running]
    for topk, k in ((None, 3), (2, 2), (1, 1)):
        with torch.inference_mode():
            replayed, loads = llm.runner.decode_logits(chunks, topk=topk)
            replayed, loads = replayed.clone(), {layer: load.clone() for layer, load in loads.items()}
            eager = llm.runner.logits(llm.runner.forward(llm.runner.prepare(chunks), topk)[0])
        assert loads and all(load.sum().item() == len(chunks) * k for load in loads.values())
        tol = 0.06 if compile else 0.02
        torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
