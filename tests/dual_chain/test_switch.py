"""The answer-level switch at its edges, confidence from the answer span's logprobs, agreement over samples."""

from __future__ import annotations

import math

import pytest

from seekforge.dual_chain import GENERATIVE, RULE, DualChain, Solution, decide, question_of
from seekforge.dual_chain.switch import aggregate, span_probability
from seekforge.engine import Logprob
from seekforge.errors import ConfigError
from seekforge.tasks import r1_zero_prompt

RULE_42 = Solution("42", "40 + 2 = 42", "arithmetic", 1.0)
UNSURE_42 = Solution("42", "a guess", "table", 0.6)


@pytest.mark.parametrize("samples, rule, threshold, override, chain, answer", [
    ([("41", 0.5)], RULE_42, 0.5, 2.0, GENERATIVE, "41"),  # at the threshold: not below it
    ([("41", 0.5)], RULE_42, math.nextafter(0.5, 1), 2.0, RULE, "42"),  # just above it: the rule chain
    ([("41", 0.0)], RULE_42, 0.0, 2.0, GENERATIVE, "41"),  # threshold 0: never below
    ([("41", 1.0)], RULE_42, 1.0, 2.0, GENERATIVE, "41"),  # certain model at threshold 1
    ([("41", 1.0)], RULE_42, 1.5, 2.0, RULE, "42"),  # above 1: whenever a solver applies
    ([("41", 0.1)], None, 0.5, 1.0, GENERATIVE, "41"),  # no solver applies: the model's stands
    ([(None, 0.0)], RULE_42, 0.0, 2.0, RULE, "42"),  # no answer from the model
    ([(None, 0.0)], None, 0.5, 1.0, GENERATIVE, None),
    ([("41", 0.99)], RULE_42, 0.5, 1.0, RULE, "42"),  # a certain solver overrides a confident model
    ([("41", 0.99)], UNSURE_42, 0.5, 1.0, GENERATIVE, "41"),  # an unsure one does not
    ([("41", 0.99)], UNSURE_42, 0.5, 0.6, RULE, "42"),  # unless override_certainty lets it (at the edge)
    ([("42.0", 0.99)], RULE_42, 0.5, 1.0, GENERATIVE, "42.0"),  # agreeing: the model's answer stands
])
def test_switch_edges(samples, rule, threshold, override, chain, answer):
    decision = decide(samples, rule, threshold, override)
    assert (decision.chain, decision.answer) == (chain, answer)
    assert decision.as_dict()["chain"] == chain


def test_agreement_across_samples():
    # 4 samples: "12" twice (one written 12.0), "13" once, no answer once
    answer, confidence, agreement = aggregate([("12", 0.8), ("13", 0.9), ("12.0", 0.4), (None, 0.0)])
    assert answer == "12" and agreement == 0.5 and confidence == pytest.approx(0.5 * (0.8 + 0.4) / 2)
    assert aggregate([]) == (None, 0.0, 0.0)
    assert aggregate([(None, 0.0), (None, 0.0)]) == (None, 0.0, 0.0)
    # a tie in count goes to the more probable answer
    assert aggregate([("1", 0.2), ("2", 0.7)])[0] == "2"


def test_span_probability_sums_the_answer_tokens(task_tokenizer):
    text = "\n3 + 4 = 7\n</think>\n<answer>17</answer>"
    ids = task_tokenizer.encode(text)
    assert task_tokenizer.decode(ids) == text
    logprobs = [Logprob(t, -0.01 * (i + 1)) for i, t in enumerate(ids)]
    # the reference: each token's own characters, decoded one at a time (ASCII text: no token splits a character)
    ends, pos = [], 0
    for t in ids:
        pos += len(task_tokenizer.decode([t]))
        ends.append(pos)
    start = text.rfind("17")
    covering = [i for i, end in enumerate(ends) if end > start and end - len(task_tokenizer.decode([ids[i]])) < start + 2]
    expected = math.exp(sum(logprobs[i].logprob for i in covering))
    assert span_probability(text, "17", ids, logprobs, task_tokenizer) == pytest.approx(expected)
    assert span_probability(text, "99", ids, logprobs, task_tokenizer) == 0.0
    assert span_probability(text, "17", ids, logprobs[:3], task_tokenizer) == 0.0  # logprobs missing


def test_question_of_prompts():
    assert question_of(r1_zero_prompt("What is 2 + 3?")) == "What is 2 + 3?"
    assert question_of("<｜begin▁of▁sentence｜><｜User｜>Hi there<｜Assistant｜><think>\n") == "Hi there"
    assert question_of("  What is 2 + 3?  ") == "What is 2 + 3?"


def test_dual_chain_settings_are_checked():
    for bad in (-0.1, 2.5, "0.5", True):
        with pytest.raises(ConfigError, match="threshold"):
            DualChain(rules=object(), threshold=bad)
    with pytest.raises(ConfigError, match="in_chain, answer_level"):
        DualChain(rules=object(), in_chain=False, answer_level=False)
