"""Held-out evaluation: pass@k by hand, accuracy bookkeeping, and the real engine path on a tiny model."""

import math

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.rl.evaluate import EvalConfig, evaluate
from seekforge.model.hf import from_pretrained
from seekforge.tasks import get_task, r1_zero_prompt
from seekforge.rl.evaluate import pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the share correct
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ConfigError, match="at least 3"):
        pass_at_k(2, 1, 3)


@pytest.fixture(scope="module")
def tok(task_tokenizer):
    return task_tokenizer


class Scripted:
    """The engine's interface, answering problem i with script(i, sample) so that results are known."""

    def __init__(self, tokenizer, script, truncate=()):
        self.tokenizer, self.script, self.truncate = tokenizer, script, truncate
        self.calls = []

    def generate(self, prompts, params):
        from types import SimpleNamespace as NS

        self.calls.append((prompts, params))
        n = params[0].n if isinstance(params, list) else params.n
        out = []
        for i, _ in enumerate(prompts):
            texts = [self.script(i, j) for j in range(n)]
            out.append(NS(outputs=[NS(token_ids=self.tokenizer.encode(t), text=t,
                                      finish_reason="length" if (i, j) in self.truncate else "stop")
                                   for j, t in enumerate(texts)]))
        return out


def test_greedy_accuracy_format_and_truncation_bookkeeping(tok):
    rows = get_task("chain_sum").rows("test", 4, 7)

    def script(i, j):  # problems 0 and 2 right (2 without tags: boxed), 1 wrong, 3 unanswered
        if i == 0:
            return f"\nwork\n</think>\n<answer>{rows[0].answer}</answer>"
        if i == 1:
            return "\nwork\n</think>\n<answer>-7</answer>"
        if i == 2:
            return f"the answer is \\boxed{{{rows[2].answer}}}"
        return "\nwork and no answer"

    llm = Scripted(tok, script, truncate={(3, 0)})
    result = evaluate(llm, EvalConfig(task="chain_sum", n=4, seed=7))
    assert result["accuracy"] == 0.5 and result["format"] == 0.5 and result["truncated"] == 0.25
    assert result["n"] == 4 and result["decoding"] == "greedy" and "pass@1" not in result
    prompts, params = llm.calls[0]
    assert params.temperature == 0 and params.n == 1
    assert prompts[0] == [tok.bos_id, *tok.encode(r1_zero_prompt(rows[0].prompt))]  # held-out test problems


def test_pass_at_k_over_samples(tok):
    rows = get_task("chain_sum").rows("test", 2, 0)

    def script(i, j):  # problem 0: samples 0 and 3 of 4 right; problem 1: none
        right = i == 0 and j in (0, 3)
        return f"\nw\n</think>\n<answer>{rows[i].answer if right else -1}</answer>"

    result = evaluate(Scripted(tok, script), EvalConfig(task="chain_sum", n=2, seed=0, k=2, samples=4))
    assert result["accuracy"] == pytest.approx(2 / 8)
    assert result["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0.0) / 2)
    with pytest.raises(ConfigError, match="samples >= k"):
        EvalConfig(task="chain_sum", k=4, samples=2)


def test_data_parallel_ranks_judge_their_share_and_report_the_whole_set(tok):
    rows = get_task("chain_sum").rows("test", 5, 3)
    problem = {tuple([tok.bos_id, *tok.encode(r1_zero_prompt(r.prompt))]): k for k, r in enumerate(rows)}

    class ByProblem(Scripted):  # answers by which problem a prompt is, wherever it sits in the call
        def generate(self, prompts, params):
            self.problems = [problem[tuple(p)] for p in prompts]
            self.truncate = {(i, 0) for i, k in enumerate(self.problems) if k == 1}
            return super().generate(prompts, params)

    def script(i, j):  # problems 0, 3 and 4 right, the rest wrong; problem 1's answer truncated
        k = llm.problems[i]
        return f"\nw\n</think>\n<answer>{rows[k].answer if k in (0, 3, 4) else -1}</answer>"

    cfg = EvalConfig(task="chain_sum", n=5, seed=3)
    llm = ByProblem(tok, script)
    whole = evaluate(llm, cfg)
    sent = []  # what rank 1 gathers is handed to rank 0 in rank order
    llm = ByProblem(tok, script)
    evaluate(llm, cfg, shard=(1, 2), gather=lambda part: sent.append(part) or [part])
    assert llm.problems == [1, 3]
    llm = ByProblem(tok, script)
    ranks = evaluate(llm, cfg, shard=(0, 2), gather=lambda part: [part, *sent])
    assert llm.problems == [0, 2, 4]
    keep = ("accuracy", "format", "completion_tokens", "truncated", "unjudged", "n")
    assert whole["accuracy"] == 0.6 and whole["truncated"] == 0.2
    assert {k: ranks[k] for k in keep} == {k: whole[k] for k in keep}


def test_engine_evaluation_is_deterministic_and_uses_the_live_model(tok, tiny_checkpoint):
    from seekforge.engine import LLM

    model = from_pretrained(tiny_checkpoint(), dtype=torch.float32).eval()
    llm = LLM(model, tokenizer=tok)
    ecfg = EvalConfig(task="chain_sum", n=6, seed=1, max_tokens=6)
    first, second = evaluate(llm, ecfg), evaluate(llm, ecfg)
    keep = ("accuracy", "format", "completion_tokens", "truncated")
    assert {k: first[k] for k in keep} == {k: second[k] for k in keep}
    assert first["n"] == 6 and first["completion_tokens"] <= 6
    with torch.no_grad():  # a change to the weights is seen by the next evaluation, no reload needed
        model.head.weight.zero_()  # every logit 0: greedy picks id 0 (BOS, not a stop token) forever
    after = evaluate(llm, ecfg)
    assert after["truncated"] == 1.0 and after["completion_tokens"] == 6 and after["accuracy"] == 0
