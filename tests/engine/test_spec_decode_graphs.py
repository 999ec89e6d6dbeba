"""MTP speculative decoding through captured steps: the verification step (1 + drafts tokens a sequence) and the
drafter's catch-up and draft steps, run from the static input buffers (`ModelRunner.replay`, `mtp_step`), against
the packed eager forward of the same steps, whole generations with and without them, and how often a speculative
step waits for the device. On the CPU the static steps run eagerly (`capture_cuda_graphs(eager=True)`: a `Rerun`
stands in for each graph); on a GPU they are captured and replayed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_cycle import CYCLE, MTP_CFG, train_on_cycle
from seekforge import LLM, SamplingParams
from seekforge.engine import model_runner
from seekforge.engine.async_step import InFlight
from seekforge.engine.model_runner import Chunk
from seekforge.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """Trained briefly on a repeating cycle: most drafts are kept, some are not."""
    torch.manual_seed(0)
    return train_on_cycle(Transformer(MTP_CFG), 20)


def prompts():
    g = torch.Generator().manual_seed(1)
    return [CYCLE[3:] + CYCLE * 2, [1], CYCLE[:5], torch.randint(1, 64, (13,), generator=g).tolist(),
            CYCLE * 3 + [7], torch.randint(1, 64, (4,), generator=g).tolist()]


def with_static_steps(llm: LLM) -> LLM:
    with torch.inference_mode():
        llm.runner.capture_cuda_graphs(llm.config.max_num_seqs, eager=True)
    return llm


def test_static_verify_and_draft_steps_equal_the_packed_forward(model):
    """A verification step of chunks of 3, 2 and 1 tokens (k = 2; a padding sequence up to the size 4) from the
    static buffer gives the packed forward's logits, hidden states and expert load at every real row; the
    drafter's catch-up over 3, 1 and 2 accepted tokens and a draft step give its hidden states and draft logits
    at each last token and write the same MTP latents."""
    llm = with_static_steps(LLM(model, block_size=4, num_speculative_tokens=2, max_num_seqs=4))
    runner = llm.runner
    assert {key for key in runner.graphs} == {(None, n) for n in (1, 2, 4)}
    assert {key for key in runner.mtp_graphs} == {(s, n) for s in (1, 3) for n in (1, 2, 4)}
    for p in prompts()[:3]:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=20))
    llm.step()  # prefill: every prompt cached, the first token sampled and two drafts made
    seqs = llm.scheduler.running
    assert [len(s.drafts) for s in seqs] == [2, 2, 2]
    for seq, n in zip(seqs, (2, 1, 0)):
        seq.drafts = seq.drafts[:n]
    chunks = llm._chunks(llm.scheduler.schedule().scheduled)[0]  # the cache slots of the drafts allocated
    assert [len(ch.token_ids) for ch in chunks] == [3, 2, 1]
    with torch.inference_mode():
        logits, loads, hidden, rows = runner.replay(chunks)
        assert rows == 3 and logits.shape[0] == hidden.shape[0] == 4 * 3
        step = runner.prepare(chunks)
        eager_hidden, eager_loads = runner.forward(step)
        eager_logits = runner.logits(eager_hidden)
        for i, ch in enumerate(chunks):
            n, at = len(ch.token_ids), step.offsets[i]
            torch.testing.assert_close(hidden[3 * i:3 * i + n], eager_hidden[at:at + n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[3 * i:3 * i + n], eager_logits[at:at + n], atol=1e-5, rtol=1e-5)
        assert {k: v.tolist() for k, v in loads.items()} == {k: v.tolist() for k, v in eager_loads.items()}

        # the drafter: its catch-up over the verified positions, then one draft step
        catch_up = [Chunk(ch.block_table, ch.start, ch.token_ids[1:] + [CYCLE[i]]) for i, ch in enumerate(chunks)]
        h_prev = [eager_hidden[step.offsets[i]:step.offsets[i] + len(ch.token_ids)] for i, ch in enumerate(chunks)]
        draft = [Chunk(ch.block_table, ch.start + len(ch.token_ids), [CYCLE[i + 3]]) for i, ch in enumerate(chunks)]
        runs, captured = {}, runner.mtp_graphs
        for mode in ("static", "eager"):
            runner.mtp_graphs = captured if mode == "static" else {}
            before = runner.mtp_cache.clone()
            runner.mtp_cache[:, :runner.scratch_block] = 0  # what each mode writes, starting from nothing
            h, first_logits = (t.clone() for t in runner.mtp_step(catch_up, h_prev))
            h2, second_logits = (t.clone() for t in runner.mtp_step(draft, list(h.split(1))))
            runs[mode] = h, first_logits, h2, second_logits, runner.mtp_cache[:, :runner.scratch_block].clone()
            runner.mtp_cache.copy_(before)
    assert runs["eager"][-1].abs().sum() > 0
    for static, eager in zip(runs["static"], runs["eager"]):
        torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)


def count_replays(monkeypatch) -> dict:
    """Counts of static-step replays by kind (main model, drafter)."""
    counts = {"main": 0, "mtp": 0}
    replay, mtp_step = model_runner.ModelRunner.replay, model_runner.ModelRunner.mtp_step

    def counted_replay(self, *args, **kwargs):
        out = replay(self, *args, **kwargs)
        counts["main"] += out is not None
        return out

    def counted_mtp(self, chunks, h_prev, device_ids=None):
        counts["mtp"] += self._graph_size(chunks, 1 if all(len(c.token_ids) == 1 for c in chunks)
                                          else self.graph_rows, [n for _, n in self.mtp_graphs]) is not None
        return mtp_step(self, chunks, h_prev, device_ids)

    monkeypatch.setattr(model_runner.ModelRunner, "replay", counted_replay)
    monkeypatch.setattr(model_runner.ModelRunner, "mtp_step", counted_mtp)
    return counts


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_decoding_through_static_steps_equals_eager(model, k, monkeypatch):
    """Whole generations with the static verify and draft steps: greedy equals plain decoding, and seeded sampling
    (two samples a prompt) equals the eager speculative run token for token; with more prompts than the largest
    graph and a token budget that chunks prefill, steps that fit no graph run eagerly in between."""
    counts = count_replays(monkeypatch)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=5, n=2, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model, block_size=4).generate(prompts(), greedy)]
    settings = dict(block_size=4, num_speculative_tokens=k, max_num_seqs=4, max_num_batched_tokens=16)
    runs = {}
    for static in (False, True):
        llm = LLM(model, **settings)
        if static:
            with_static_steps(llm)
        runs[static] = ([o.token_ids for o in llm.generate(prompts(), greedy)],
                        [[c.token_ids for c in o.outputs] for o in llm.generate(prompts(), seeded)])
        if static:
            assert llm.stats()["speculative"]["acceptance_rate"][0] > 0.3
    assert counts["main"] > 10 and counts["mtp"] > 10
    assert runs[True][0] == runs[False][0] == plain
    assert runs[True][1] == runs[False][1]


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "graphs+compile"])
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_mtp_graphs_equal_eager(model, batch, compile, monkeypatch):
    """On the GPU (bf16): MTP decoding replayed from CUDA graphs at batch 1 and 8 gives the eager MTP run's tokens,
    greedy (equal to plain graph decoding too) and seeded. Graph and eager steps round bf16 differently (other
    kernels), so the model is trained on until its next token is near certain: a seeded draw (or an argmax) can
    then only part where the two paths' probabilities differ by far more than rounding."""
    counts = count_replays(monkeypatch)
    gpu_model = Transformer(MTP_CFG).cuda()
    gpu_model.load_state_dict(model.state_dict())
    train_on_cycle(gpu_model, 60)
    gpu_model = gpu_model.to(torch.bfloat16).eval()
    batch_prompts = [(CYCLE * 3)[i:i + 4 + 3 * i] for i in range(batch)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, max_tokens=32, seed=7, ignore_eos=True)
    settings = dict(max_num_seqs=8, async_scheduling=False)
    plain = LLM(gpu_model, cuda_graphs=True, compile=compile, **settings)
    runs = {}
    for graphs in (False, True):
        llm = LLM(gpu_model, num_speculative_tokens=2, cuda_graphs=graphs, compile=compile and graphs, **settings)
        assert bool(llm.runner.mtp_graphs) == graphs
        runs[graphs] = [[o.token_ids for o in llm.generate(batch_prompts, params)] for params in (greedy, seeded)]
    assert counts["main"] > 10 and counts["mtp"] > 10
    assert runs[True][0] == [o.token_ids for o in plain.generate(batch_prompts, greedy)]
    assert runs[True] == runs[False]


def count_waits(monkeypatch) -> dict:
    """Counts of the calls in a step that on CUDA wait for the device: a tensor read on the host (.tolist, .item)
    and a torch.tensor(list, device=...) copy from pageable memory ("waits"), and the reads of drafts copied back
    without blocking (`InFlight.host_tokens`, "deferred"), whose own .tolist reads pinned host memory."""
    counts = {"waits": 0, "deferred": 0}
    inside = [False]
    tolist, item, tensor, host_tokens = torch.Tensor.tolist, torch.Tensor.item, torch.tensor, InFlight.host_tokens

    def read(method):
        def counted(self, *args, **kwargs):
            counts["waits"] += not inside[0]
            return method(self, *args, **kwargs)
        return counted

    def counted_tensor(*args, **kwargs):
        counts["waits"] += kwargs.get("device") is not None
        return tensor(*args, **kwargs)

    def counted_host_tokens(self):
        counts["deferred"] += 1
        inside[0] = True
        try:
            return host_tokens(self)
        finally:
            inside[0] = False

    monkeypatch.setattr(torch.Tensor, "tolist", read(tolist))
    monkeypatch.setattr(torch.Tensor, "item", read(item))
    monkeypatch.setattr(torch, "tensor", counted_tensor)
    monkeypatch.setattr(InFlight, "host_tokens", counted_host_tokens)
    return counts


@pytest.mark.parametrize("k, penalty", [(1, 1.0), (3, 1.0), (3, 1.2)], ids=["k1", "k3", "k3-penalty"])
def test_a_speculative_step_waits_for_the_device_once(model, k, penalty, monkeypatch):
    """A steady speculative step (greedy, static steps) reads the device once, for its verified tokens, whatever
    the number of drafts: each chain step takes the last drafts on the device, and all come back while the host
    settles the step (one deferred read). With a penalty, which reads a draft row's history on the host, each draft
    but the last is read at once (k - 1 more). On CUDA each wait drains the pipeline."""
    llm = with_static_steps(LLM(model, block_size=4, num_speculative_tokens=k, max_num_seqs=4))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=penalty)
    for p in prompts()[:3]:
        llm.add_request(p, params)
    for _ in range(3):  # prefill, then decoding with drafts
        llm.step()
    assert all(len(s.drafts) == k for s in llm.scheduler.running)
    counts = count_waits(monkeypatch)
    steps = 4
    for _ in range(steps):
        llm.step()
    assert counts == {"waits": steps * (1 if penalty == 1.0 else k), "deferred": steps}


class DeviceOps(TorchDispatchMode):
    """Counts the ops a step runs outside its static steps (a graph's replay on CUDA, one launch), by name: on a GPU
    each is a launch the host pays for, while the device waits on so small a model. Views launch nothing."""

    VIEWS = {"slice", "select", "split", "view", "unsqueeze", "squeeze", "resolve_conj", "resolve_neg", "lift_fresh",
             "alias", "detach", "expand", "as_strided", "reshape", "t", "unbind"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.inside = 0  # inside a static step's replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        name = "copy" if name in ("copy_", "to", "_to_copy") else name  # to the device: `copy_` or `to` by device
        if not self.inside and name not in self.VIEWS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 3])
def test_a_greedy_speculative_step_runs_few_ops_beside_its_static_steps(model, k, monkeypatch):
    """A steady greedy speculative step (no penalties) runs, beside its static steps: one input copy to each static
    step (the verification's, the drafter's catch-up and each chain step's), the hidden states' copy into the
    drafter's buffer at each drafter step, one argmax for the verification and one a draft depth, and in each chain
    step the write of the last drafts (their rows' copy, a gather, a scatter); with several depths, the drafts' join.
    Acceptance, the drafts' sampling batch and their bookkeeping stay on the host: no op a draft or a sequence."""
    llm = with_static_steps(LLM(model, block_size=4, num_speculative_tokens=k, max_num_seqs=4))
    for p in prompts()[:3]:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.step()
    ops_mode = DeviceOps()
    replay = model_runner.Rerun.replay

    def counted_replay(self):
        ops_mode.inside += 1
        try:
            replay(self)
        finally:
            ops_mode.inside -= 1

    monkeypatch.setattr(model_runner.Rerun, "replay", counted_replay)
    steps = 4
    with ops_mode:
        for _ in range(steps):
            llm.step()
    chain = k - 1
    expected = {"copy": 2 + 2 * chain, "cat": 1 + chain + (k > 1), "argmax": 1 + k, "index": chain,
                "index_put_": chain}
    assert ops_mode.counts == {name: n * steps for name, n in expected.items() if n}


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_speculative_step_synchronises_once(model, k):
    """On the GPU with CUDA graphs (bf16), torch's sync debug mode sees one synchronisation a steady speculative step,
    for its verified tokens, whatever the number of drafts (the deferred drafts' event wait is no stream
    synchronisation: by then the host has settled the step)."""
    gpu_model = Transformer(MTP_CFG).cuda()
    gpu_model.load_state_dict(model.state_dict())
    llm = LLM(gpu_model.to(torch.bfloat16).eval(), num_speculative_tokens=k, cuda_graphs=True, max_num_seqs=4)
    for p in prompts()[:3]:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert all(len(s.drafts) == k for s in llm.scheduler.running)
    steps = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                llm.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == steps, syncs
