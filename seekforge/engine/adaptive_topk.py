"""Adaptive expert activation: under saturation the engine routes each token to fewer experts.

The controller watches two signals after every engine step: the queue (sequences waiting for a slot) and the
step's wall time. When either stays past its mark for `patience_down` steps in a row, the routed top-k drops one
level (for example 6 -> 4 -> 2 at the 16b shape); when both stay calm (nothing waiting, the step quicker than its
mark) for `patience_up` steps in a row, it climbs one level back. Moving to a level restarts both counts, and
climbing takes longer than dropping, so a load near the mark does not make it flap.

A step runs at the larger of the controller's k and the largest minimum of its requests
(`SamplingParams.min_experts`; at or above the model's k a request opts out), so a request that asks for every
expert never runs with fewer. The model never sees the controller: the engine passes the step's k to the forward
(`seekforge.model.backend.Backend.topk`), and the gate normalises the chosen experts' weights as its config says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from seekforge.errors import ConfigError


def default_levels(topk: int) -> tuple[int, ...]:
    """The model's k, about two thirds of it, about a third of it (6 -> 6, 4, 2; 8 -> 8, 6, 3; 2 -> 2, 1)."""
    return tuple(sorted({topk, -(-2 * topk // 3), -(-topk // 3)}, reverse=True))


@dataclass
class AdaptiveTopK:
    """The controller. `levels`: the routed top-k it may run, the model's k first, descending, each >= 1.
    Saturated: at least `queue_high` sequences waiting, or a step of at least `latency_high` seconds (None: the
    queue alone). Calm: at most `queue_low` waiting and (with `latency_high`) a step under `latency_low` seconds
    (None: half of latency_high)."""

    levels: tuple[int, ...]
    queue_high: int = 1
    queue_low: int = 0
    latency_high: float | None = None
    latency_low: float | None = None
    patience_down: int = 4
    patience_up: int = 16

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        if (not levels or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in levels)
                or list(levels) != sorted(set(levels), reverse=True)):
            raise ConfigError(f"adaptive experts: levels must be distinct integers >= 1 in descending order, the "
                              f"model's routed top-k first (e.g. 6 4 2), got {self.levels!r}")
        self.levels = levels
        if not 0 <= self.queue_low < self.queue_high:
            raise ConfigError(f"adaptive experts: need 0 <= queue_low < queue_high, got {self.queue_low} and "
                              f"{self.queue_high}")
        if self.latency_high is not None:
            if not self.latency_high > 0:
                raise ConfigError(f"adaptive experts: latency_high is seconds > 0, got {self.latency_high}")
            if self.latency_low is None:
                self.latency_low = self.latency_high / 2
            if not 0 < self.latency_low < self.latency_high:
                raise ConfigError(f"adaptive experts: need 0 < latency_low < latency_high, got {self.latency_low} "
                                  f"and {self.latency_high}")
        if self.patience_down < 1 or self.patience_up < 1:
            raise ConfigError("adaptive experts: patience_down and patience_up are steps >= 1")
        self.level = 0
        self._hot = self._calm = 0
        self.seconds = {k: 0.0 for k in levels}  # wall time spent at each k
        self.steps = {k: 0 for k in levels}
        self._since: float | None = None

    @property
    def topk(self) -> int:
        return self.levels[self.level]

    def observe(self, waiting: int, step_seconds: float, now: float | None = None) -> int:
        """Take one step's signals (sequences waiting after it, its wall time); returns the k for the next step."""
        now = time.monotonic() if now is None else now
        if self._since is not None:
            self.seconds[self.topk] += now - self._since
        self._since = now
        self.steps[self.topk] += 1
        slow = self.latency_high is not None and step_seconds >= self.latency_high
        quick = self.latency_high is None or step_seconds < self.latency_low
        self._hot = self._hot + 1 if waiting >= self.queue_high or slow else 0
        self._calm = self._calm + 1 if waiting <= self.queue_low and quick else 0
        if self._hot >= self.patience_down and self.level < len(self.levels) - 1:
            self._move(+1)
        elif self._calm >= self.patience_up and self.level > 0:
            self._move(-1)
        return self.topk

    def _move(self, by: int) -> None:
        self.level += by
        self._hot = self._calm = 0

    def step_topk(self, minimums: list[int | None]) -> int | None:
        """The k of a step whose requests ask for `minimums` (None: no minimum): None where that is the model's."""
        k = max([self.topk, *(m for m in minimums if m is not None)])
        return None if k >= self.levels[0] else k

    def stats(self) -> dict:
        return {"topk": self.topk, "levels": list(self.levels), "seconds_at_k": dict(self.seconds),
                "steps_at_k": dict(self.steps)}
