"""Mixed GRPO runs: several tasks in one run, each with its own reward sources.

A task source names a task, the share of each step's prompts it gets, and how its completions are rewarded:
rule or user reward functions (seekforge.rewards) and/or "reward_model", the run's reward model (a trained
`seekforge rm` checkpoint, scored in batches with no gradient, or a scoring endpoint; seekforge.rl.reward_model).
Verifiable tasks take rule rewards, the rest the reward model, in one run. Each group's rewards are combined
with its own task's weights (a function the task does not use is NaN there and contributes nothing,
seekforge.rl.loss.combine_rewards), then normalised within the group as in a single-task run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from seekforge.errors import ConfigError
from seekforge.rewards import RewardSet

REWARD_MODEL = "reward_model"  # the reward name that stands for the run's reward model


@dataclass
class TaskSource:
    """One task of a mixed run and its reward sources."""

    task: str
    knobs: dict = field(default_factory=dict)
    # reward functions as GRPOConfig.rewards takes them; "reward_model" names the run's reward model
    rewards: str | list = "accuracy,format"
    reward_weights: list[float] | None = None
    share: float = 1.0  # relative share of each step's prompts
    label: str = ""  # how records and resume state name it (default: the task's name)

    def __post_init__(self) -> None:
        if self.share <= 0:
            raise ConfigError(f"task source {self.task!r}: share must be > 0, got {self.share}")
        self.label = self.label or self.task
        items = reward_items(self.rewards)
        if self.reward_weights is not None and len(self.reward_weights) != len(items):
            raise ConfigError(f"task source {self.label!r}: {len(self.reward_weights)} reward weights for "
                              f"{len(items)} rewards ({self.rewards!r}); give one weight per reward")

    @property
    def uses_reward_model(self) -> bool:
        return REWARD_MODEL in self.reward_names()

    def reward_names(self) -> list[str]:
        """The names the rewards are listed under (a {name: ...} item's name)."""
        return [item if isinstance(item, str) else str(item.get("name")) for item in reward_items(self.rewards)]


def reward_items(spec: str | list) -> list:
    """The items of a reward spec ("accuracy,format" or a list of names and {name: ...} dicts)."""
    return [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """n prompts split by `shares` (largest remainder; ties to the earlier source), summing to n."""
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [int(e) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    return counts


class TaskRewards:
    """A task source's rewards: its rule/user functions (a RewardSet, each behind a timeout) and the weight
    of the reward model, in the order the spec lists them."""

    def __init__(self, source: TaskSource, timeout_s: float):
        items = reward_items(source.rewards)
        weights = source.reward_weights or [1.0] * len(items)
        rules = [(item, w) for item, w in zip(items, weights) if item != REWARD_MODEL]
        self.rules = (RewardSet([i for i, _ in rules], [w for _, w in rules], timeout_s) if rules else None)
        self.uses_model = len(rules) < len(items)
        rule_names = iter(self.rules.names if self.rules else [])
        self.names = [REWARD_MODEL if item == REWARD_MODEL else next(rule_names) for item in items]
        self.weights = [float(w) for w in weights]

    def score(self, prompt: str, completion, row) -> dict[str, float | None]:
        """The rule rewards of one completion (the reward model's are added in a batch afterwards)."""
        return self.rules.score(prompt, completion, row) if self.rules else {}

    def counters(self) -> dict[str, dict[str, float]]:
        return self.rules.counters() if self.rules else {}

    def close(self) -> None:
        if self.rules:
            self.rules.close()
