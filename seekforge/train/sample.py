"""Sampling from a model on the inference engine: scored rollouts, and rejection sampling.

Everything here generates with `seekforge.LLM` over the live model's weights (batched: every prompt
times n samples in one `generate` call) and scores completions with reward functions wrapped in
`safe_reward`, so a reward that raises or hangs costs a None, never the run.

    seekforge sample --from CKPT --task chain_sum --n-per-prompt 4 --keep-correct --out traces.jsonl

writes one {"prompt", "completion", ...} row per kept completion, the format `seekforge sft --data` reads.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from seekforge.configio import atomic_write_text
from seekforge.errors import ConfigError
from seekforge.rewards import SafeReward, load_reward_functions, row_fields, safe_reward
from seekforge.tasks import Row, get_task, r1_zero_prompt

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


class RewardSet:
    """Named reward functions behind timeouts and exception barriers, with optional weights."""

    def __init__(self, spec, weights: Sequence[float] | None = None, timeout_s: float = 5.0):
        fns = load_reward_functions(spec)
        if weights is not None and len(weights) != len(fns):
            raise ConfigError(f"{len(weights)} reward weights for {len(fns)} reward functions ({', '.join(fns)}); "
                              f"give one weight per function")
        self.names = list(fns)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(fns)
        self.fns: dict[str, SafeReward] = {name: safe_reward(fn, timeout_s, name=name) for name, fn in fns.items()}
        self._wants_length = {name: _accepts(fn, "completion_length") for name, fn in fns.items()}

    def score(self, prompt: str, completion: Completion, row: Row) -> dict[str, float | None]:
        fields = row_fields(row)
        out = {}
        for name, fn in self.fns.items():
            extra = {"completion_length": len(completion.token_ids)} if self._wants_length[name] else {}
            out[name] = fn(prompt, completion.text, **fields, **extra)
        return out

    def counters(self) -> dict[str, dict[str, float]]:
        return {name: fn.metrics() for name, fn in self.fns.items()}

    def close(self) -> None:
        for fn in self.fns.values():
            fn.close()


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def generate(llm, rows: Sequence[Row], *, n: int, temperature: float, max_tokens: int, seed: int | None,
             template: str = "r1_zero", top_p: float = 1.0, top_k: int = 0,
             rewards: RewardSet | None = None) -> Rollouts:
    """n completions of every row's question in one batched engine call (greedy when temperature is 0),
    scored by `rewards` when given."""
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
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 stop_token_ids=stop, seed=(seed + 7919 * i) % 2**62) for i in range(len(prompts))]
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


# ------------------------------------------------------------------------------------------ rejection sampling
@dataclass
class SampleConfig:
    init_from: str  # the checkpoint to sample (HF layout with its tokenizer)
    task: str
    task_knobs: dict = field(default_factory=dict)
    out: str = "samples.jsonl"
    n_prompts: int = 1000
    n_per_prompt: int = 4
    keep_correct: bool = True  # keep only completions the accuracy reward scores 1 (else keep all, scored)
    max_per_prompt: int = 1  # distinct kept completions per prompt (0 = all)
    split: Literal["train", "test"] = "train"
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    template: Template = "r1_zero"
    rewards: str = "accuracy,format"
    reward_timeout_s: float = 5.0
    batch_prompts: int = 256  # prompts per engine call
    device: str = "auto"

    def __post_init__(self) -> None:
        for key in ("n_prompts", "n_per_prompt", "max_tokens", "batch_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sample: {key} must be >= 1, got {getattr(self, key)}")
        if self.max_per_prompt < 0:
            raise ConfigError(f"sample: max_per_prompt must be >= 0 (0 keeps all), got {self.max_per_prompt}")


def is_correct(rewards: Mapping[str, float | None]) -> bool:
    """Judged right by the accuracy reward (and, when present, well formed)."""
    if rewards.get("accuracy") != 1.0:
        return False
    return rewards.get("format", 1.0) == 1.0


def sft_row(prompt: str, completion: Completion, row: Row, template: str) -> dict:
    """A kept completion as an SFT example: prompt/completion for the R1-Zero template, a chat for 'chat'."""
    extra = {"task": row.task, "answer": row.answer, "rewards": completion.rewards}
    if template == "chat":
        return {"messages": [{"role": "user", "content": row.prompt},
                             {"role": "assistant", "content": "<think>\n" + completion.text}], **extra}
    return {"prompt": prompt, "completion": completion.text, **extra}


def rejection_sample(llm, cfg: SampleConfig, progress: bool = False) -> tuple[list[dict], dict]:
    """Sample cfg.n_per_prompt completions for cfg.n_prompts task rows and keep the correct ones
    (at most max_per_prompt distinct ones per prompt). Returns (SFT rows, statistics)."""
    task = get_task(cfg.task, **cfg.task_knobs)
    rows = task.rows(cfg.split, cfg.n_prompts, cfg.seed)
    rewards = RewardSet(cfg.rewards, timeout_s=cfg.reward_timeout_s)
    if cfg.keep_correct and "accuracy" not in rewards.names:
        raise ConfigError("--keep-correct needs the accuracy reward among --rewards")
    kept: list[dict] = []
    stats = {"prompts": 0, "samples": 0, "correct": 0, "kept": 0, "prompts_solved": 0, "tokens": 0, "seconds": 0.0}
    try:
        from tqdm import tqdm

        with tqdm(total=len(rows), desc="sample", unit="prompt", disable=not progress) as bar:
            for lo in range(0, len(rows), cfg.batch_prompts):
                batch = rows[lo:lo + cfg.batch_prompts]
                r = generate(llm, batch, n=cfg.n_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_tokens, seed=cfg.seed * 1_000_003 + lo, template=cfg.template,
                             rewards=rewards)
                stats["tokens"] += r.tokens
                stats["seconds"] += r.seconds
                for i, group in enumerate(r.groups):
                    seen: set[str] = set()
                    correct = [c for c in group if is_correct(c.rewards)]
                    stats["correct"] += len(correct)
                    stats["prompts_solved"] += bool(correct)
                    for c in (correct if cfg.keep_correct else group):
                        if c.text in seen or (cfg.max_per_prompt and len(seen) >= cfg.max_per_prompt):
                            continue
                        seen.add(c.text)
                        kept.append(sft_row(r.prompts[i], c, r.rows[i], cfg.template))
                stats["prompts"] += len(batch)
                stats["samples"] += len(batch) * cfg.n_per_prompt
                bar.update(len(batch))
    finally:
        rewards.close()
    stats["kept"] = len(kept)
    stats["accuracy"] = stats["correct"] / max(stats["samples"], 1)
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return kept, stats


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ConfigError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
