"""A run's reward functions: named, each behind a timeout and an exception barrier (safe_reward), weighted."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from seekforge.errors import ConfigError
from seekforge.rewards.loading import load_reward_functions, row_fields
from seekforge.rewards.safe import SafeReward, safe_reward
from seekforge.tasks import Row


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

    def score(self, prompt: str, completion, row: Row) -> dict[str, float | None]:
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
