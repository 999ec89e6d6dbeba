"""Rejection sampling: sample a model on a task's problems, keep the completions judged correct as SFT rows.

    seekforge sample --from CKPT --task chain_sum --n-per-prompt 4 --keep-correct --out traces.jsonl

writes one {"prompt", "completion", ...} row per kept completion, the format `seekforge sft --data` reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from seekforge.configio import atomic_write_text
from seekforge.errors import ConfigError
from seekforge.rewards import RewardSet
from seekforge.rl.rollout import Completion, Template, generate
from seekforge.tasks import Row, get_task


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
