from __future__ import annotations

import math

import pytest

from seekforge.configio import from_dict
from seekforge.errors import ConfigError
from seekforge.train.schedule import LRSchedule

PEAK, FINAL, TAIL = 2.2e-4, 2.2e-5, 7.3e-6
W, C, D, H, T = 20, 30, 100, 10, 5


@pytest.fixture
def sched():
    return LRSchedule(peak_lr=PEAK, warmup_steps=W, constant_steps=C, decay_steps=D, final_lr=FINAL,
                      tail_steps=T, tail_lr=TAIL, hold_steps=H)


def test_total_steps(sched):
    assert sched.total_steps == W + C + D + H + T == 165


def test_warmup_edges(sched):
    assert sched.lr(0) == pytest.approx(PEAK / W, rel=1e-12)
    assert sched.lr(9) == pytest.approx(PEAK * 10 / W, rel=1e-12)
    assert sched.lr(W - 1) == pytest.approx(PEAK, rel=1e-12)


def test_constant_edges(sched):
    assert sched.lr(W) == PEAK
    assert sched.lr(W + C - 1) == PEAK


def test_cosine_against_closed_form(sched):
    start = W + C
    assert sched.lr(start) == pytest.approx(PEAK, rel=1e-12)  # cos(0) = 1
    assert sched.lr(start + D // 2) == pytest.approx((PEAK + FINAL) / 2, rel=1e-12)  # cos(pi/2) = 0
    assert sched.lr(start + D // 4) == pytest.approx(FINAL + (PEAK - FINAL) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    for s in (1, 37, D - 1):
        expected = FINAL + 0.5 * (PEAK - FINAL) * (1 + math.cos(math.pi * s / D))
        assert sched.lr(start + s) == pytest.approx(expected, rel=1e-12)
    assert FINAL < sched.lr(start + D - 1) < FINAL * 1.01


def test_decay_end_hold_and_tail(sched):
    end = W + C + D
    assert sched.lr(end) == FINAL
    assert sched.lr(end + H - 1) == FINAL
    assert sched.lr(end + H) == TAIL
    assert sched.lr(sched.total_steps - 1) == TAIL
    assert sched.lr(sched.total_steps + 1000) == TAIL  # overshooting keeps the last value


def test_shape_is_continuous_and_non_increasing_after_warmup(sched):
    values = [sched.lr(s) for s in range(sched.total_steps)]
    assert all(a < b for a, b in zip(values[:W], values[1:W]))
    assert all(b <= a for a, b in zip(values[W - 1:], values[W:]))
    step_sizes = [a - b for a, b in zip(values[W:W + C + D], values[W + 1:W + C + D + 1])]
    assert max(step_sizes) < (PEAK - FINAL) * math.pi / D  # no jump inside constant + cosine


def test_without_tail_or_warmup():
    s = LRSchedule(peak_lr=1.0, warmup_steps=0, constant_steps=0, decay_steps=4, final_lr=0.0)
    assert [s.lr(i) for i in range(6)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                         0.5 + 0.5 * math.cos(3 * math.pi / 4), 0.0, 0.0])
    assert s.total_steps == 4


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(warmup_steps=-1), "warmup_steps must be a whole number >= 0"),
    (dict(decay_steps=2.5), "decay_steps must be a whole number"),
    (dict(final_lr=1e-3), r"final_lr \(the cosine floor\) must lie in \[0, peak_lr"),
    (dict(peak_lr=0.0), "peak_lr must be a positive number"),
    (dict(tail_steps=5), "tail_steps > 0 needs tail_lr"),
    (dict(tail_lr=1e-6), "tail_lr is set but tail_steps is 0"),
    (dict(tail_steps=5, tail_lr=1.0), r"tail_lr must lie in \[0, peak_lr"),
])
def test_lr_schedule_rejects_nonsense(kwargs, pattern):
    base = dict(peak_lr=PEAK, warmup_steps=W, constant_steps=C, decay_steps=D, final_lr=FINAL)
    with pytest.raises(ConfigError, match=pattern):
        LRSchedule(**{**base, **kwargs})


def test_negative_step_rejected(sched):
    with pytest.raises(ValueError):
        sched.lr(-1)


def test_schedule_loads_from_config_dict():
    s = from_dict(LRSchedule, {"peak_lr": 2.2e-4, "warmup_steps": 2, "constant_steps": 0, "decay_steps": 2,
                               "final_lr": 2.2e-5}, where="train.yaml")
    assert s.lr(0) == pytest.approx(1.1e-4)
    with pytest.raises(ConfigError, match=r"train\.yaml: LRSchedule: final_lr \(the cosine floor\)"):
        from_dict(LRSchedule, {"peak_lr": 1e-4, "warmup_steps": 2, "constant_steps": 0, "decay_steps": 2,
                               "final_lr": 1e-3}, where="train.yaml")

