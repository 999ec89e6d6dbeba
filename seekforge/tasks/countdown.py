"""Countdown: reach a target from given numbers with + - * / and parentheses.

The answer is an expression, so any correct expression scores: the check evaluates it with
the safe evaluator, requires the value to equal the target and every number written in it to
be one of the given numbers, each used at most once.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from seekforge.errors import ConfigError
from seekforge.tasks.base import Row, Task, check_int, final_line
from seekforge.tasks.safe_eval import ExpressionError, evaluate_detailed

_ATOM, _PRODUCT, _SUM = 3, 2, 1  # precedence of an expression's outermost operator


def _wrap(text: str, needs: bool) -> str:
    return f"({text})" if needs else text


def combine(left: tuple[int, str, int], op: str, right: tuple[int, str, int]) -> tuple[int, str, int]:
    """(value, text, precedence) of `left op right`, parenthesised only where needed."""
    (a, ta, pa), (b, tb, pb) = left, right
    if op == "+":
        return a + b, f"{ta} + {tb}", _SUM
    if op == "-":
        return a - b, f"{ta} - {_wrap(tb, pb == _SUM)}", _SUM
    if op == "*":
        return a * b, f"{_wrap(ta, pa == _SUM)} * {_wrap(tb, pb == _SUM)}", _PRODUCT
    return a // b, f"{_wrap(ta, pa == _SUM)} / {_wrap(tb, pb != _ATOM)}", _PRODUCT


def check_countdown(expression: str | None, numbers: list[int], target: int) -> bool:
    """Whether `expression` equals `target` using each of `numbers` at most once.

    A trailing "= <target>" is allowed ("8 * 3 - 5 = 19"). Unparseable or over-limit text is
    simply wrong."""
    if not expression:
        return False
    left, _, right = expression.partition("=")
    try:
        result = evaluate_detailed(left)
        if right.strip() and evaluate_detailed(right).value != target:
            return False
    except ExpressionError:
        return False
    if result.value != target or any(v.denominator != 1 for v in result.literals):
        return False
    used = Counter(int(v) for v in result.literals)
    return not used - Counter(numbers)


@dataclass
class CountdownTask(Task):
    """min_numbers..max_numbers numbers from 1..max_number; the target (1..max_target, not one of
    the numbers) comes from a random expression over all of them with whole intermediates."""

    name = "countdown"
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 20
    max_target: int = 100

    def __post_init__(self) -> None:
        check_int(self.name, "min_numbers", self.min_numbers, 2, 8)
        check_int(self.name, "max_numbers", self.max_numbers, self.min_numbers, 8)
        check_int(self.name, "max_number", self.max_number, 2, 10**6)
        check_int(self.name, "max_target", self.max_target, 2, 10**9)

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        for _ in range(1000):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            found = self._solve_randomly(rng, numbers)
            if found is not None:
                break
        else:
            raise ConfigError(
                f"countdown: cannot make targets up to max_target={self.max_target} from "
                f"{self.max_numbers} numbers up to {self.max_number}; raise max_target"
            )
        target, expression, steps = found
        shown = ", ".join(map(str, numbers))
        row = Row(
            task=self.name,
            prompt=(
                f"Using the numbers {shown}, write an expression that equals {target}. "
                "You may use +, -, *, / and parentheses, and each number at most once."
            ),
            answer=expression,
            solution="\n".join(
                [f"Combine the numbers {shown} step by step to reach {target}.", *steps, final_line(expression)]
            ),
            meta={"numbers": numbers, "target": target},
        )
        return f"{sorted(numbers)}->{target}", row

    def _solve_randomly(self, rng: random.Random, numbers: list[int]) -> tuple[int, str, list[str]] | None:
        pool = [(n, str(n), _ATOM) for n in numbers]
        steps = []
        while len(pool) > 1:
            left = pool.pop(rng.randrange(len(pool)))
            right = pool.pop(rng.randrange(len(pool)))
            (a, b) = left[0], right[0]
            ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            merged = combine(left, op, right)
            steps.append(f"{a} {op} {b} = {merged[0]}")
            pool.append(merged)
        target, expression, _ = pool[0]
        if not 1 <= target <= self.max_target or target in numbers:
            return None
        return target, expression, steps

    def score(self, predicted: str | None, answer: str | None, meta: dict) -> float | None:
        if "numbers" not in meta or "target" not in meta:
            return None
        return 1.0 if check_countdown(predicted, meta["numbers"], meta["target"]) else 0.0
