"""DualChain: the rule chain beside the generative chain, as an inference mode of the engine.

    from seekforge.dual_chain import DualChain
    dual = DualChain(threshold=0.5)                        # RuleChain() of the default solvers
    outs = llm.generate(prompts, params, dual_chain=dual)
    outs[0].dual_chain.chain, outs[0].dual_chain.answer, outs[0].dual_chain.confidence

Both ways of combining are on by default: in-chain (`in_chain`: the Calculator inserts exact results as the
model writes expressions) and answer-level (`answer_level`: the switch of seekforge.dual_chain.switch picks
the answer). The engine only calls `sampling_params` and `decide` (it imports nothing from here).
"""

from __future__ import annotations

import dataclasses
import re

from seekforge.dual_chain.calc import Calculator
from seekforge.dual_chain.chain import RuleChain
from seekforge.dual_chain.switch import Decision, decide, span_probability
from seekforge.errors import ConfigError
from seekforge.tasks.answers import extract_answer

# the user's turn in the prompt templates seekforge writes and reads (R1-Zero's, DeepSeek's)
_USER_TURN = re.compile(r"(?:\nUser: |<｜User｜>)(.*?)(?:\nAssistant:|<｜Assistant｜>|$)", re.S)


def question_of(prompt: str) -> str:
    """The question a prompt asks: its last user turn where a chat template wrote one, else the whole prompt."""
    turns = _USER_TURN.findall(prompt)
    return (turns[-1] if turns else prompt).strip()


class DualChain:
    def __init__(self, rules: RuleChain | None = None, *, threshold: float = 0.5, override_certainty: float = 1.0,
                 in_chain: bool = True, answer_level: bool = True):
        """`threshold`: the generative chain's confidence (0..1) below which the rule chain answers (0: only where
        the model gave no answer; above 1: whenever a solver applies). `override_certainty`: a solver at least this
        sure overrides a model that disagrees, however confident (above 1: never)."""
        for name, value in (("threshold", threshold), ("override_certainty", override_certainty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
                raise ConfigError(f"dual chain: {name} must be a number from 0 to 2 (confidence and certainty are "
                                  f"in [0, 1]; above 1 means always or never), got {value!r}")
        if not (in_chain or answer_level):
            raise ConfigError("dual chain: turn on in_chain, answer_level or both")
        self.rules = rules if rules is not None else RuleChain()
        self.threshold, self.override_certainty = float(threshold), float(override_certainty)
        self.in_chain, self.answer_level = in_chain, answer_level

    def sampling_params(self, params, tokenizer):
        """`params` with the token logprobs the confidence needs (logprobs=0 where none were asked for) and, in
        chain, the calculator as the request's inserter."""
        if tokenizer is None:
            raise ConfigError("the dual chain needs a tokenizer (tokenizer.json beside the checkpoint)")
        changes = {"logprobs": params.logprobs if params.logprobs is not None else 0}
        if self.in_chain:
            changes["inserter"] = Calculator(tokenizer)
        return dataclasses.replace(params, **changes)

    def decide(self, output, tokenizer, question: str | None = None) -> Decision:
        """The decision for one finished RequestOutput (all its n completions); `question` defaults to the
        prompt's last user turn."""
        if question is None:
            prompt = output.prompt if output.prompt is not None else tokenizer.decode(
                output.prompt_token_ids, skip_special_tokens=True)
            question = question_of(prompt)
        samples = []
        for c in output.outputs:
            answer = extract_answer(c.text or "")
            p = span_probability(c.text, answer, c.token_ids, c.logprobs or [], tokenizer) if answer else 0.0
            samples.append((answer, p))
        rule = self.rules.solve(question) if self.answer_level else None
        # in-chain only: the switch still reports the model's confidence, and never hands over
        return decide(samples, rule, self.threshold if self.answer_level else 0.0,
                      self.override_certainty if self.answer_level else 2.0)

    def close(self) -> None:
        self.rules.close()
