"""The answer-level switch: the generative chain's confidence against a threshold decides which chain answers.

Confidence of one completion: the probability the model gave its own final answer, exp of the summed token
log-probabilities over the answer's span (the tokens that wrote the text extract_answer returns). Of n
completions: the majority answer's share of the n (agreement) times the mean confidence of the completions
that gave it; a completion without an answer counts against agreement. Where that is below the threshold,
or the rule chain is at least `override_certainty` sure and disagrees, the rule chain's answer is used (where
a solver applies; otherwise the model's stands).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from seekforge.dual_chain.solver import Solution
from seekforge.tasks.answers import answers_match

GENERATIVE, RULE = "generative", "rule"


@dataclass(frozen=True)
class Decision:
    chain: str  # GENERATIVE or RULE: whose answer `answer` is
    answer: str | None
    confidence: float  # the generative chain's, in [0, 1]
    threshold: float
    model_answer: str | None
    agreement: float  # share of the completions that gave model_answer
    rule: Solution | None  # the rule chain's answer, where a solver applied

    def as_dict(self) -> dict:
        return {"chain": self.chain, "answer": self.answer, "confidence": self.confidence,
                "threshold": self.threshold, "model_answer": self.model_answer, "agreement": self.agreement,
                "rule": self.rule.as_dict() if self.rule is not None else None}


def span_probability(text: str, answer: str, token_ids: Sequence[int], logprobs: Sequence, tokenizer) -> float:
    """exp(sum of the logprobs of the tokens that wrote the last occurrence of `answer` in `text`); 0.0 where it
    cannot be found. `logprobs[i]` is token i's (seekforge.engine.Logprob); text decodes token_ids."""
    start = text.rfind(answer)
    if start < 0 or len(logprobs) < len(token_ids) or not token_ids:
        return 0.0
    end = start + len(answer)

    def first_token_ending_after(pos: int) -> int:  # the token whose text reaches past character `pos`
        lo, hi = 0, len(token_ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(token_ids[:mid + 1], skip_special_tokens=True)) > pos:
                hi = mid
            else:
                lo = mid + 1
        return lo

    first, last = first_token_ending_after(start), first_token_ending_after(end - 1)
    return math.exp(sum(lp.logprob for lp in logprobs[first:last + 1]))


def aggregate(samples: Sequence[tuple[str | None, float]]) -> tuple[str | None, float, float]:
    """(majority answer, confidence, agreement) of n (answer, span probability) samples."""
    groups: list[list[tuple[str, float]]] = []
    for answer, p in samples:
        if answer is None:
            continue
        group = next((g for g in groups if answers_match(answer, g[0][0])), None)
        if group is None:
            groups.append([(answer, p)])
        else:
            group.append((answer, p))
    if not groups or not samples:
        return None, 0.0, 0.0
    best = max(groups, key=lambda g: (len(g), sum(p for _, p in g)))
    agreement = len(best) / len(samples)
    return best[0][0], agreement * sum(p for _, p in best) / len(best), agreement


def decide(samples: Sequence[tuple[str | None, float]], rule: Solution | None, threshold: float,
           override_certainty: float = 1.0) -> Decision:
    """Which chain answers: the rule chain's where the model is less sure than `threshold` (strictly below) or
    gave no answer, or where the rule chain is at least `override_certainty` sure and disagrees; else the model's."""
    answer, confidence, agreement = aggregate(samples)
    use_rule = rule is not None and (
        answer is None or confidence < threshold
        or (rule.certainty >= override_certainty and not answers_match(answer, rule.answer)))
    chosen = RULE if use_rule else GENERATIVE
    return Decision(chosen, rule.answer if use_rule else answer, confidence, threshold, answer, agreement, rule)
