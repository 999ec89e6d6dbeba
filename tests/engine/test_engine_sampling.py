"""Sampling and MTP speculative decoding: transforms against transformers' logits processors, the
rejection rule against its target distribution, seeded reproducibility, logprobs against a plain
forward, and speculative greedy output identical to plain decoding."""

from __future__ import annotations

import pytest
import torch

from hf_reference import save_hf
from mtp_cycle import CYCLE, MTP_CFG, train_on_cycle
from seekforge import LLM, SamplingParams, ops
from seekforge.engine.sampler import SAMPLE, Row, filter_logits, make_batch, sample, target_logits
from seekforge.engine.sequence import Request, Sequence
from seekforge.engine.spec_decode import verify
from seekforge.model import Transformer

# transformers writes num_nextn_predict_layers but no MTP weights; the loader says so, rightly
pytestmark = [pytest.mark.filterwarnings("ignore:config.json declares"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def random_mtp_model():
    torch.manual_seed(0)
    return Transformer(MTP_CFG).eval()


@pytest.fixture(scope="module")
def trained_mtp_model():
    """Trained briefly on a repeating cycle, main head and MTP module alike: drafts are mostly right."""
    torch.manual_seed(0)
    return train_on_cycle(Transformer(MTP_CFG), 30)


def seq_for(params: SamplingParams, prompt=(1, 2, 3), key=None) -> Sequence:
    return Sequence(0, Request("r", None, list(prompt), params), 0, key)


# ------------------------------------------------------------------------------------------ transforms
def test_filters_match_transformers_logits_processors():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    cases = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.1),
             dict(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05), dict(temperature=1.0),
             dict(temperature=0.9, repetition_penalty=1.4, top_p=0.7)]
    torch.manual_seed(0)
    logits = torch.randn(len(cases), 50) * 3
    prompt, output = [3, 7, 7, 11], [7, 20, 41]
    rows = [Row(SamplingParams(**c), None, prompt, output) for c in cases]
    batch = make_batch(rows, 50, logits.device)
    ours = filter_logits(target_logits(logits, batch), batch)
    history = torch.tensor([prompt + output])
    for i, c in enumerate(cases):
        ref = logits[i:i + 1].clone()
        processors = [RepetitionPenaltyLogitsProcessor(c.get("repetition_penalty", 1.0)),
                      TemperatureLogitsWarper(c["temperature"])]
        if "top_k" in c:
            processors.append(TopKLogitsWarper(c["top_k"]))
        if "top_p" in c:
            processors.append(TopPLogitsWarper(c["top_p"]))
        if "min_p" in c:
            processors.append(MinPLogitsWarper(c["min_p"]))
        for proc in processors:
            ref = proc(history, ref)
        kept = torch.isfinite(ref[0])
        assert torch.equal(torch.isfinite(ours[i]), kept), c
        assert torch.allclose(ours[i][kept], ref[0][kept], atol=1e-5), c


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.zeros(1, 6)
    rows = [Row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0), None,
                [4], [1, 1, 1, 2])]
    out = target_logits(logits + torch.tensor([[1.0, 1.0, -1.0, 0, 2.0, 0]]), make_batch(rows, 6, logits.device))
    # token 1: 1/2 (repetition) - 0.5 - 3 * 0.25; token 2: -1 * 2 - 0.5 - 0.25; token 4 (prompt only): 2 / 2
    assert torch.allclose(out, torch.tensor([[1.0, 0.5 - 1.25, -2.0 - 0.75, 0.0, 1.0, 0.0]]))


def test_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 8) * 2
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    rows = [Row(params, None)] * 40000
    batch = make_batch(rows, 8, logits.device)
    tokens, _ = sample(logits.expand(len(rows), -1), batch, [0] * len(rows))
    expected = filter_logits(logits, make_batch(rows[:1], 8, logits.device)).softmax(dim=-1)[0]
    freq = torch.bincount(tokens, minlength=8).float() / len(rows)
    assert (freq - expected).abs().max() < 0.01
    assert freq[expected == 0].sum() == 0


def test_each_row_draws_its_own_counter_based_race():
    """A batch of seeded, unseeded and greedy rows: a seeded row's token is argmax(p / -log u), u the uniforms of its
    key and counter (drawn here one row at a time), whatever the other rows; unseeded rows follow torch's seed."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 2
    hot, cool = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=9, seed=2)
    unseeded, greedy = SamplingParams(temperature=1.0), SamplingParams(temperature=0)
    rows = [Row(hot, 11), Row(unseeded, None), Row(cool, -5), Row(greedy, None), Row(hot, 11)]
    counters = [7, 3, 2**35, 1, 8]
    batch = make_batch(rows, 40, logits.device)
    tokens = sample(logits, batch, counters)[0]
    for i in (0, 2, 4):
        probs = filter_logits(logits[i:i + 1], make_batch(rows[i:i + 1], 40, logits.device)).softmax(-1)[0]
        u = ops.uniform(torch.tensor([rows[i].key]), torch.tensor([counters[i]]), SAMPLE, 40)[0]
        assert tokens[i] == (probs / -u.log()).argmax(), i
    assert tokens[3] == logits[3].argmax()
    alone = sample(logits[2:3], make_batch(rows[2:3], 40, logits.device), counters[2:3])[0]
    assert alone.item() == tokens[2]
    torch.manual_seed(5)
    unseeded = [sample(logits[1:2].expand(64, -1), make_batch(rows[1:2] * 64, 40, logits.device), [0] * 64)[0]
                for _ in range(2)]
    torch.manual_seed(5)
    assert torch.equal(sample(logits[1:2].expand(64, -1), make_batch(rows[1:2] * 64, 40, logits.device), [0] * 64)[0],
                       unseeded[0])
    assert not torch.equal(*unseeded)  # fresh keys at every draw


# ------------------------------------------------------------------------------------------ rejection rule
def test_rejection_rule_emits_the_target_distribution():
    """Drafts from q, verification against p: the first emitted token follows p[0]; when the first
    draft is kept, the second follows p[1]; draft 1 is kept with probability sum(min(p, q))."""
    n, vocab = 20000, 5
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(2)], 1)
    params = SamplingParams(temperature=1.0)
    seqs = []
    for d in drafts.tolist():
        s = seq_for(params)
        s.drafts, s.draft_probs = d, q
        seqs.append(s)
    logits = p.log().repeat(n, 1)  # rows 3i, 3i+1, 3i+2 belong to sequence i
    rows = [Row(params, None)] * (3 * n)
    out = verify(logits, make_batch(rows, vocab, logits.device), [3 * i for i in range(n)], seqs)
    first = torch.tensor([v.tokens[0] for v in out])
    assert (torch.bincount(first, minlength=vocab) / n - p[0]).abs().max() < 0.015
    second = torch.tensor([v.tokens[1] for v in out if v.accepted >= 1])
    assert (torch.bincount(second, minlength=vocab) / len(second) - p[1]).abs().max() < 0.02
    assert abs(len(second) / n - torch.minimum(p[0], q[0]).sum()) < 0.015


def test_greedy_verification_keeps_drafts_while_they_equal_the_argmax():
    params = SamplingParams(temperature=0)
    logits = torch.full((4, 10), -5.0)
    logits[0, 3] = logits[1, 4] = logits[2, 9] = logits[3, 1] = 5.0  # argmax 3, 4, 9, 1
    seqs = [seq_for(params), seq_for(params)]
    seqs[0].drafts = [3, 4, 8]  # two right, then wrong: emits 3, 4, then the argmax 9
    seqs[1].drafts = []
    rows = [Row(params, None)] * 5  # rows 0-3: the first sequence's positions; row 4: the second's
    out = verify(torch.cat([logits, logits[:1]]), make_batch(rows, 10, logits.device), [0, 4], seqs)
    assert out[0].tokens == [3, 4, 9] and out[0].accepted == 2
    assert out[1].tokens == [3] and out[1].accepted == 0


def test_greedy_verification_takes_each_rows_penalised_argmax():
    """Greedy rows with a repetition penalty (2): a row's argmax is over its logits penalised by its own history
    (the prompt, the output and the drafts before it). Hand-computed: the first sequence's row 0 prefers 2 (3.0)
    but 2 is in the prompt (1.5 < 2.0 for token 1), row 1 prefers 1 (4.0), now in its history (2.0 < 3.0 for 5):
    both drafts kept, then row 2's argmax 0. The second sequence's draft 4 is not row 3's argmax 1 (4 in its
    output: 6.0 / 2 < 3.5): it emits 1 alone."""
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    logits = torch.full((5, 6), -1.0)
    logits[0, 2], logits[0, 1] = 3.0, 2.0
    logits[1, 1], logits[1, 5] = 4.0, 3.0
    logits[2, 0] = 1.0
    logits[3, 4], logits[3, 1] = 6.0, 3.5
    logits[4, 0] = 1.0
    first, second = seq_for(params, prompt=(2, 3)), seq_for(params, prompt=(3,))
    first.drafts, second.drafts = [1, 5], [4]
    second.token_ids.append(4)  # its output so far: token 4
    rows = [Row(params, None, [2, 3], [1, 5][:j]) for j in range(3)] + [Row(params, None, [3], [4] + [4][:j])
                                                                           for j in range(2)]
    out = verify(logits, make_batch(rows, 6, logits.device), [0, 3], [first, second])
    assert (list(out[0].tokens), out[0].accepted, list(out[0].rows)) == ([1, 5, 0], 2, [0, 1, 2])
    assert (list(out[1].tokens), out[1].accepted, list(out[1].rows)) == ([1], 0, [3])


def test_a_seeded_sequence_verifies_alike_beside_any_drafts():
    """A seeded sequence without drafts, verified beside one with three, emits the token it samples alone (its
    draws do not depend on how many drafts the batch holds), and a seeded sequence's verification is reproducible."""
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, seed=3)
    logits = torch.randn(5, 30)
    drafter, plain = seq_for(params, key=21), seq_for(params, prompt=(4, 5), key=22)
    drafter.drafts, drafter.draft_probs = [1, 2, 3], logits[:3].softmax(-1)
    rows = [Row(params, 21)] * 4 + [Row(params, 22)]
    both = verify(logits, make_batch(rows, 30, logits.device), [0, 4], [drafter, plain])
    alone = verify(logits[4:], make_batch(rows[4:], 30, logits.device), [0], [plain])
    assert list(both[1].tokens) == list(alone[0].tokens)
    assert verify(logits, make_batch(rows, 30, logits.device), [0, 4], [drafter, plain]) == both


# ------------------------------------------------------------------------------------------ the engine
def test_seeded_sampling_is_reproducible_whatever_the_batch(random_mtp_model):
    llm = LLM(random_mtp_model, block_size=4)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    prompt = [1, 2, 3, 4, 5]
    alone = llm.generate(prompt, seeded)[0].token_ids
    assert llm.generate(prompt, seeded)[0].token_ids == alone
    others = [[9, 8, 7], [4, 4, 4, 4, 4, 4, 4, 4, 4]]
    mixed = llm.generate([others[0], prompt, others[1]],
                         [SamplingParams(temperature=1.0, max_tokens=20), seeded, SamplingParams(temperature=0.5)])
    assert mixed[1].token_ids == alone
    assert llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=8))[0].token_ids != alone
    n3 = SamplingParams(temperature=1.0, max_tokens=12, seed=7, n=3)
    a, b = llm.generate(prompt, n3)[0], llm.generate(prompt, n3)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_logprobs_are_the_model_log_softmax(random_mtp_model):
    llm = LLM(random_mtp_model, block_size=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0]
    with torch.no_grad():
        logp = random_mtp_model(torch.tensor([prompt + out.token_ids])).log_softmax(dim=-1)[0]
    assert len(out.logprobs) == 6
    for j, lp in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + j]
        assert lp.token_id == out.token_ids[j]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        assert list(lp.top) == row.topk(3).indices.tolist() and lp.token_id == next(iter(lp.top))
    assert abs(out.outputs[0].cumulative_logprob - sum(lp.logprob for lp in out.logprobs)) < 1e-6


def test_repetition_penalty_matches_transformers_generate(tmp_path):
    hf = save_hf("v2_softmax_greedy", tmp_path)
    llm = LLM(tmp_path, block_size=4)
    prompt = [5, 17, 17, 40, 5, 9]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
                          eos_token_id=10**6)[0, len(prompt):].tolist()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8, ignore_eos=True))
    assert out[0].token_ids == ref


# ------------------------------------------------------------------------------------------ speculative decoding
def test_speculative_greedy_equals_plain_decoding(random_mtp_model, trained_mtp_model):
    prompts = [[1], [5, 9, 12], CYCLE * 2 + [5], [21, 40, 2, 17] * 3, [7] * 23]
    params = SamplingParams(temperature=0, max_tokens=24)
    for model in (random_mtp_model, trained_mtp_model):
        plain = [o.token_ids for o in LLM(model, block_size=4).generate(prompts, params)]
        for k in (1, 3):
            spec = LLM(model, block_size=4, num_speculative_tokens=k)
            assert [o.token_ids for o in spec.generate(prompts, params)] == plain
            # and under a tight token budget and a small cache: chunked prefill and preemption
            tight = LLM(model, block_size=4, num_speculative_tokens=k, max_num_batched_tokens=6, num_blocks=14)
            assert [o.token_ids for o in tight.generate(prompts, params)] == plain
    rates = spec.stats()["speculative"]["acceptance_rate"]
    assert len(rates) == 3 and rates[0] > 0.8  # the trained model drafts its cycle right


def test_speculative_sampling_follows_the_model_distribution(random_mtp_model):
    """With drafts from a random MTP module (often rejected), the second sampled token still follows
    the main model's marginal sum_t1 p(t1) p(t2 | t1), computed exactly by one batched forward."""
    model, prompt, n = random_mtp_model, [3, 14, 15, 9, 26], 3000
    vocab = model.cfg.vocab_size
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(dim=-1)
        both = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
        p2 = p1 @ model(both)[:, -1].softmax(dim=-1)
    llm = LLM(model, block_size=4, num_speculative_tokens=1)
    # 3 tokens: the first is sampled after the prefill, the second by verifying one draft
    out = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=3, n=n, seed=0))[0]
    second = torch.tensor([c.token_ids[1] for c in out.outputs])
    observed = torch.bincount(second, minlength=vocab).float()
    expected = p2 * n
    big = expected >= 5
    chi2 = (((observed - expected) ** 2 / expected)[big].sum()
            + (observed[~big].sum() - expected[~big].sum()) ** 2 / max(expected[~big].sum(), 1e-9))
    dof = int(big.sum())
    assert chi2 < dof + 6 * (2 * dof) ** 0.5  # far beyond chance (p < 1e-6) only if the rule is wrong
    stats = llm.stats()["speculative"]
    assert stats["proposed"][0] == n and 0 < stats["accepted"][0] < n  # both branches of the rule ran


def test_seeded_speculative_sampling_is_reproducible_whatever_the_batch(random_mtp_model):
    """With drafts (often rejected: a random MTP module), alone and beside sequences that draft more or fewer
    tokens, and each of a request's completions its own."""
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=5, n=2)
    prompt = CYCLE[:4]
    llm = LLM(random_mtp_model, block_size=4, num_speculative_tokens=3)
    alone = [c.token_ids for c in llm.generate(prompt, seeded)[0].outputs]
    others = [SamplingParams(temperature=1.0, max_tokens=5), SamplingParams(temperature=0.8, max_tokens=20, seed=1)]
    mixed = llm.generate([[7] * 9, prompt, CYCLE], [others[0], seeded, others[1]])
    assert [c.token_ids for c in mixed[1].outputs] == alone and alone[0] != alone[1]
    assert 0 < llm.stats()["speculative"]["accepted"][0] < llm.stats()["speculative"]["proposed"][0]


@pytest.mark.gpu
def test_speculative_decoding_on_cuda(trained_mtp_model):
    model = Transformer(MTP_CFG)
    model.load_state_dict(trained_mtp_model.state_dict())
    model = model.cuda().eval()
    prompts = [[5, 9, 12], CYCLE * 2 + [5], [7] * 23]
    params = SamplingParams(temperature=0, max_tokens=24)
    cpu = [o.token_ids for o in LLM(trained_mtp_model).generate(prompts, params)]
    spec = LLM(model, num_speculative_tokens=2)
    assert [o.token_ids for o in spec.generate(prompts, params)] == cpu
    sampled = spec.generate(prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=1))
    assert all(len(o.token_ids) == 24 for o in sampled)


def test_oversized_logprobs_and_top_k_never_reach_a_batched_step():
    import pytest as _pytest

    from seekforge import LLM, ConfigError, ModelConfig, SamplingParams, Transformer

    model = Transformer(ModelConfig.preset("tiny").replace(n_mtp_modules=0)).eval()
    llm = LLM(model, num_blocks=64)
    with _pytest.raises(ConfigError, match="exceeds the vocabulary"):
        llm.add_request([1, 2, 3], SamplingParams(logprobs=10_000))
    outs = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(top_k=2**63, max_tokens=3, seed=1),
                                              SamplingParams(top_k=5, max_tokens=3, seed=2)])
    assert [len(o.token_ids) for o in outs] == [3, 3]
    assert {"num_waiting", "num_running"} <= set(llm.stats())
