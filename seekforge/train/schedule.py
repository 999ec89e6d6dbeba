"""The DeepSeek-V3 learning-rate schedule, indexed by optimizer step.

Convention: `step` is the number of optimizer updates already taken, so the first update uses `lr(0)`.
The schedule holds no state; a resumed run recomputes it from its step. (The MTP weight and the bias
update speed are two-piece constants: TrainConfig.mtp_lambda and TrainConfig.gamma.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seekforge.errors import ConfigError

__all__ = ["LRSchedule"]


def _check_steps(owner: str, **steps: int) -> None:
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{owner}: {name} must be a whole number >= 0, got {value!r}")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


@dataclass
class LRSchedule:
    """DeepSeek-V3's learning rate: warm-up, constant, cosine, hold, step-down.

    Phases, in update steps (W = warmup_steps, C = constant_steps, D = decay_steps, H = hold_steps,
    T = tail_steps):

    - warm-up, 0 <= step < W: `peak_lr * (step + 1) / W`. The first update gets peak/W rather than 0
      (an update at lr 0 would be wasted compute) and step W-1 reaches the peak exactly.
    - constant, W <= step < W+C: `peak_lr`.
    - cosine, W+C <= step < W+C+D, with s = step - W - C:
      `final_lr + (peak_lr - final_lr) * (1 + cos(pi * s / D)) / 2`, from peak_lr down towards final_lr.
    - hold, W+C+D <= step < W+C+D+H: `final_lr` (V3: 2.2e-5 after the cosine).
    - tail, step >= W+C+D+H: `tail_lr` when tail_steps > 0 (V3: 7.3e-6), else `final_lr`.

    `total_steps` = W+C+D+H+T; past it the last phase's value continues, so a run that overshoots
    keeps a sane learning rate. The V3 recipe (steps counted in its batches): peak 2.2e-4, warm-up 2K
    steps, cosine to 2.2e-5, hold at 2.2e-5, final tail at 7.3e-6.
    """

    peak_lr: float
    warmup_steps: int
    constant_steps: int
    decay_steps: int
    final_lr: float
    tail_steps: int = 0
    tail_lr: float | None = None
    hold_steps: int = 0

    def __post_init__(self) -> None:
        _check_steps("LRSchedule", warmup_steps=self.warmup_steps, constant_steps=self.constant_steps,
                     decay_steps=self.decay_steps, hold_steps=self.hold_steps, tail_steps=self.tail_steps)
        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            raise ConfigError(f"LRSchedule: peak_lr must be a positive number, got {self.peak_lr!r}")
        if not 0 <= self.final_lr <= self.peak_lr:
            raise ConfigError(
                f"LRSchedule: final_lr (the cosine floor) must lie in [0, peak_lr={self.peak_lr}], "
                f"got {self.final_lr!r}"
            )
        if self.tail_steps > 0 and self.tail_lr is None:
            raise ConfigError("LRSchedule: tail_steps > 0 needs tail_lr (the learning rate of the final steps)")
        if self.tail_lr is not None:
            if self.tail_steps == 0:
                raise ConfigError("LRSchedule: tail_lr is set but tail_steps is 0; set tail_steps or drop tail_lr")
            if not 0 <= self.tail_lr <= self.peak_lr:
                raise ConfigError(
                    f"LRSchedule: tail_lr must lie in [0, peak_lr={self.peak_lr}], got {self.tail_lr!r}"
                )

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.constant_steps + self.decay_steps + self.hold_steps + self.tail_steps

    def lr(self, step: int) -> float:
        """The learning rate of update number `step` (0-based)."""
        _check_step(step)
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        s = step - self.warmup_steps
        if s < self.constant_steps:
            return self.peak_lr
        s -= self.constant_steps
        if s < self.decay_steps:
            return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * s / self.decay_steps))
        s -= self.decay_steps
        if s < self.hold_steps or self.tail_lr is None:
            return self.final_lr
        return self.tail_lr

