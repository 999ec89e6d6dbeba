"""Held-out task accuracy (and pass@k) on the inference engine.

    seekforge eval runs/rl/final --task chain_sum --n 500 --seed 0          # greedy accuracy
    seekforge eval runs/rl/final --task chain_sum --n 500 --k 4 --samples 8  # plus unbiased pass@4

Problems come from the task's test split, which no training split shares. Accuracy is the accuracy
reward of the greedy completion (k = 1), or the mean over the sampled completions (k > 1); a completion
the reward cannot judge (None, an error, a timeout) counts as wrong and is reported as unjudged.
All problems go to the engine in one batched call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from seekforge.errors import ConfigError
from seekforge.tasks import get_task
from seekforge.rewards import RewardSet
from seekforge.rl.rollout import generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ConfigError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalConfig:
    task: str
    task_knobs: dict = field(default_factory=dict)
    n: int = 500
    seed: int = 0  # which test problems
    split: str = "test"
    k: int = 1  # pass@k; k = 1 with samples = 1 is greedy accuracy
    samples: int | None = None  # completions per problem when sampling (>= k; default k)
    temperature: float = 1.0  # for sampling (k > 1 or samples > 1)
    max_tokens: int = 256
    template: str = "r1_zero"
    reward_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for key in ("n", "k", "max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval: {key} must be >= 1, got {getattr(self, key)}")
        if self.samples is not None and self.samples < self.k:
            raise ConfigError(f"eval: pass@{self.k} needs samples >= k, got samples={self.samples}")

    @property
    def n_samples(self) -> int:
        return self.samples or self.k


def evaluate(llm, cfg: EvalConfig, shard: tuple[int, int] = (0, 1), gather=None) -> dict:
    """Accuracy of `llm`'s model on cfg.n held-out problems; a JSON-ready dict.

    Under data parallelism, shard = (rank, ranks): this process judges every ranks-th problem from its rank, and
    `gather` (a local object -> every rank's, in rank order) makes the figures those of the whole set."""
    rows = get_task(cfg.task, **cfg.task_knobs).rows(cfg.split, cfg.n, cfg.seed)
    rank, ranks = shard
    mine = rows[rank::ranks]
    m = cfg.n_samples
    greedy = m == 1
    start = time.perf_counter()
    part = {"correct": [], "format": 0, "unjudged": 0, "tokens": 0, "truncated": 0, "generation_s": 0.0}
    if mine:
        rewards = RewardSet("accuracy,format", timeout_s=cfg.reward_timeout_s)
        try:
            r = generate(llm, mine, n=m, temperature=0.0 if greedy else cfg.temperature, max_tokens=cfg.max_tokens,
                         seed=None if greedy else cfg.seed, template=cfg.template, rewards=rewards)
        finally:
            rewards.close()
        completions = [c for g in r.groups for c in g]
        part = {"correct": [[c.rewards["accuracy"] == 1.0 for c in g] for g in r.groups],
                "format": sum(c.rewards["format"] == 1.0 for c in completions),
                "unjudged": sum(c.rewards["accuracy"] is None for c in completions),
                "tokens": r.tokens, "truncated": sum(c.truncated for c in completions), "generation_s": r.seconds}
    part["seconds"] = time.perf_counter() - start
    parts = gather(part) if gather is not None else [part]
    correct = [c for p in parts for c in p["correct"]]
    completions = max(sum(map(len, correct)), 1)
    tokens = sum(p["tokens"] for p in parts)
    out = {
        "task": cfg.task, **({"task_knobs": cfg.task_knobs} if cfg.task_knobs else {}),
        "split": cfg.split, "n": len(rows), "seed": cfg.seed,
        "decoding": "greedy" if greedy else f"sampled, temperature {cfg.temperature}, {m} per problem",
        "accuracy": sum(map(sum, correct)) / completions,
    }
    if cfg.k > 1 or not greedy:
        out[f"pass@{cfg.k}"] = sum(pass_at_k(m, sum(c), cfg.k) for c in correct) / max(len(rows), 1)
    out.update({
        "format": sum(p["format"] for p in parts) / completions,
        "unjudged": sum(p["unjudged"] for p in parts),
        "completion_tokens": tokens / completions,
        "truncated": sum(p["truncated"] for p in parts) / completions,
        "seconds": round(max(p["seconds"] for p in parts), 3),  # the slowest rank's
        "tokens_per_s": round(tokens / max(max(p["generation_s"] for p in parts), 1e-9), 1),
    })
    return out


def load_llm(checkpoint, device: str = "auto"):
    """A checkpoint directory on the engine: fp32 on a CPU (bf16 matmuls are slow there), its own dtype elsewhere."""
    import torch

    from seekforge.engine import LLM
    from seekforge.train.optim import pick_device

    dev = pick_device(device)
    return LLM(str(checkpoint), device=str(dev), dtype=torch.float32 if dev.type == "cpu" else None)
