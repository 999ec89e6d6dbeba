"""Adaptive expert activation: the controller on synthetic load traces, and the engine running its k."""

import pytest
import torch

from hf_reference import save_hf
from seekforge.engine import LLM, SamplingParams
from seekforge.engine.adaptive_topk import AdaptiveTopK, default_levels
from seekforge.errors import ConfigError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run(controller: AdaptiveTopK, trace, latency=0.01) -> list[int]:
    """The k after each step of a trace of queue depths (one step a second)."""
    return [controller.observe(w, latency, now=float(t)) for t, w in enumerate(trace)]


def test_default_levels():
    assert default_levels(6) == (6, 4, 2)
    assert default_levels(8) == (8, 6, 3)
    assert default_levels(2) == (2, 1)
    assert default_levels(1) == (1,)


def test_sustained_queue_lowers_k_a_level_per_patience_and_recovers_slower():
    c = AdaptiveTopK((6, 4, 2), patience_down=3, patience_up=5)
    ks = run(c, [5] * 8 + [0] * 12)
    # 3 saturated steps -> 4, 3 more -> 2 (the floor: it stays), then 5 calm steps a level back up
    assert ks == [6, 6, 4, 4, 4, 2, 2, 2] + [2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6]


def test_short_bursts_do_not_lower_k():
    c = AdaptiveTopK((6, 4, 2), patience_down=3, patience_up=5)
    assert set(run(c, [9, 9, 0] * 10)) == {6}  # never 3 saturated steps in a row


def test_load_at_the_mark_does_not_flap():
    """A queue that hovers around the mark (alternating saturated and not, but never calm for long): k drops
    and stays down, where a controller without hysteresis would switch every step."""
    c = AdaptiveTopK((6, 4, 2), queue_high=4, queue_low=0, patience_down=2, patience_up=4)
    ks = run(c, [4, 5, 3, 4, 4, 2, 4, 4, 1, 5, 5, 3] * 4)
    changes = sum(a != b for a, b in zip(ks, ks[1:]))
    assert changes == 2 and ks[-1] == 2  # down twice, never back up: the queue is never empty for 4 steps


def test_step_latency_saturates_and_calms():
    c = AdaptiveTopK((4, 2), latency_high=0.1, patience_down=2, patience_up=2)
    assert c.latency_low == 0.05
    ks = [c.observe(0, s, now=float(t)) for t, s in enumerate([0.2, 0.2, 0.07, 0.07, 0.07, 0.01, 0.01])]
    # slow steps lower k; steps between the marks neither lower nor raise it; quick ones raise it
    assert ks == [4, 2, 2, 2, 2, 2, 4]


def test_time_and_steps_at_each_k():
    c = AdaptiveTopK((4, 2), patience_down=2, patience_up=2)
    for t, w in [(0.0, 3), (1.0, 3), (3.0, 0), (4.5, 0), (5.0, 0)]:
        c.observe(w, 0.01, now=t)
    # intervals: [0, 1] at 4; after the second step k = 2: [1, 3] and [3, 4.5] at 2; then back to 4: [4.5, 5]
    assert c.seconds == {4: 1.5, 2: 3.5}
    assert c.steps == {4: 3, 2: 2}
    assert c.stats()["topk"] == 4


def test_step_topk_takes_the_largest_request_minimum():
    c = AdaptiveTopK((6, 4, 2))
    assert c.step_topk([None, None]) is None  # the model's k: nothing to override
    c.level = 2
    assert c.step_topk([None, None]) == 2
    assert c.step_topk([None, 3]) == 3
    assert c.step_topk([1, 4]) == 4
    assert c.step_topk([None, 6]) is None and c.step_topk([9]) is None  # opted out


@pytest.mark.parametrize("kwargs,match", [
    (dict(levels=(4, 6)), "descending"), (dict(levels=(6, 0)), ">= 1"), (dict(levels=()), "levels"),
    (dict(levels=(6, 4), queue_high=0), "queue_low < queue_high"),
    (dict(levels=(6, 4), latency_high=0.1, latency_low=0.2), "latency_low < latency_high"),
])
def test_bad_controller_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaptiveTopK(**kwargs)


def test_bad_engine_settings(tmp_path):
    save_hf("v3_sigmoid_grouped_qlora", tmp_path)  # k = 2
    with pytest.raises(ConfigError, match="start at the model's routed top-k 2"):
        LLM(tmp_path, adaptive_experts=True, adaptive_expert_levels=[4, 2])
    with pytest.raises(ConfigError, match="min_experts must be an integer >= 1"):
        SamplingParams(min_experts=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_hf("v3_sigmoid_grouped_qlora", path, num_experts_per_tok=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 9, 3, 12)]
    return path, prompts


def test_outputs_identical_with_the_controller_off_and_never_triggered(checkpoint):
    path, prompts = checkpoint
    off = LLM(path, block_size=4, max_num_seqs=8)
    # nothing waits (8 slots, 4 prompts) and no latency mark: the controller stays at the model's k
    on = LLM(path, block_size=4, max_num_seqs=8, adaptive_experts=True)
    want = [o.token_ids for o in off.generate(prompts, GREEDY)]
    assert [o.token_ids for o in on.generate(prompts, GREEDY)] == want
    stats = on.stats()["adaptive_experts"]
    assert stats["topk"] == 3 and stats["steps_at_k"][3] > 0 and sum(stats["steps_at_k"].values()) == \
        stats["steps_at_k"][3]
    assert "adaptive_experts" not in off.stats()


def test_a_lowered_k_routes_fewer_experts_unless_a_request_asks_for_more(checkpoint):
    path, prompts = checkpoint
    llm = LLM(path, block_size=4, max_num_seqs=8, adaptive_experts=True, adaptive_expert_levels=[3, 1],
              enable_prefix_caching=False)  # every prefill computes the whole prompt
    llm.adaptive.level, llm.adaptive.patience_up = 1, 10**9  # held at k = 1
    n = len(prompts[1])
    for min_experts, k in ((None, 1), (2, 2), (3, 3), (7, 3)):
        llm.add_request(prompts[1], SamplingParams(max_tokens=1, min_experts=min_experts))
        llm.step()  # the prompt's prefill
        assert llm.expert_load, "the step ran the MoE layers"
        for load in llm.expert_load.values():
            assert load.sum().item() == n * k
            assert (load > 0).sum().item() >= k  # the chosen experts are distinct
        while llm.has_unfinished_requests():
            llm.step()
    # against the same checkpoint configured at k = 1 in full (independent of the override's plumbing)
    one = path.parent / "k1"
    save_hf("v3_sigmoid_grouped_qlora", one, num_experts_per_tok=1)
    ref = LLM(one, block_size=4, max_num_seqs=8)
    assert ([o.token_ids for o in llm.generate(prompts, GREEDY)]
            == [o.token_ids for o in ref.generate(prompts, GREEDY)])
