"""Rollouts: n completions of task questions sampled on the inference engine, scored by reward functions.

Generation runs on `seekforge.LLM` over the live model's weights (batched: every prompt times n samples in
one `generate` call); each completion is scored by a RewardSet (seekforge.rewards), so a reward that raises
or hangs costs a None, never the run. GRPO's rollouts, rejection sampling and evaluation all sample here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from seekforge.errors import ConfigError
from seekforge.rewards import RewardSet
from seekforge.tasks import Row, r1_zero_prompt

Template = Literal["r1_zero", "chat"]


def render_prompt(question: str, template: str, tokenizer=None) -> str:
    """The text a task question is posed in: DeepSeek-R1-Zero's template (a base model, as the built-in
    corpus writes it), or the tokenizer's chat template opening a think block (a chat model)."""
    if template == "r1_zero":
        return r1_zero_prompt(question)
    if template == "chat":
        if tokenizer is None:
            raise ConfigError("template 'chat' needs the checkpoint's tokenizer")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             thinking=True)
    raise ConfigError(f"unknown prompt template {template!r}; use r1_zero or chat")


def answer_stop_ids(tokenizer) -> list[int]:
    """Stop right after "</answer>" when the tokenizer holds it as one token: the R1 rewards read nothing
    after it, and the stop token stays in the completion (unlike a stop string, which is cut off)."""
    tid = tokenizer.token_to_id("</answer>") if tokenizer is not None else None
    return [tid] if tid is not None else []


@dataclass
class Completion:
    prompt_index: int  # which row (prompt) of the batch it answers
    token_ids: list[int]
    text: str
    truncated: bool  # stopped by max_tokens, not by the model
    rewards: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Rollouts:
    rows: list[Row]
    prompts: list[str]
    prompt_ids: list[list[int]]
    groups: list[list[Completion]]  # groups[i]: the samples of prompt i
    seconds: float  # generation time
    tokens: int  # completion tokens generated

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def generate(llm, rows: Sequence[Row], *, n: int, temperature: float, max_tokens: int,
             seed: int | Sequence[int] | None, template: str = "r1_zero", top_p: float = 1.0, top_k: int = 0,
             rewards: RewardSet | None = None) -> Rollouts:
    """n completions of every row's question in one batched engine call (greedy when temperature is 0),
    scored by `rewards` when given. `seed`: None (torch's generator), one seed for the call, or one per row
    (a row's completions then depend on its seed alone, not on the other rows of the call)."""
    from seekforge.engine import SamplingParams

    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ConfigError("sampling from a task needs the checkpoint's tokenizer (tokenizer.json beside it)")
    prompts = [render_prompt(row.prompt, template, tokenizer) for row in rows]
    # a text prompt is encoded as the engine encodes one; a rendered chat as transformers does (the template wrote BOS)
    prompt_ids = [tokenizer.encode(p) if template == "chat" else tokenizer.encode_prompt(p) for p in prompts]
    stop = answer_stop_ids(tokenizer)
    if seed is None:  # torch's global generator: reproducible when the caller seeds (and checkpoints) it
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                stop_token_ids=stop)
    else:  # one seed per prompt, so that prompts do not share random draws
        seeds = [(seed + 7919 * i) % 2**62 for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} rows")
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 stop_token_ids=stop, seed=s) for s in seeds]
    start = time.perf_counter()
    outs = llm.generate(prompt_ids, params) if prompt_ids else []
    seconds = time.perf_counter() - start
    groups, tokens = [], 0
    for i, out in enumerate(outs):
        group = []
        for c in out.outputs:
            text = c.text if c.text is not None else tokenizer.decode(c.token_ids, skip_special_tokens=True)
            group.append(Completion(i, list(c.token_ids), text, c.finish_reason == "length"))
            tokens += len(c.token_ids)
        groups.append(group)
    rollouts = Rollouts(list(rows), prompts, prompt_ids, groups, seconds, tokens)
    if rewards is not None:
        for i, group in enumerate(groups):
            for c in group:
                c.rewards = rewards.score(prompts[i], c, rows[i])
    return rollouts
