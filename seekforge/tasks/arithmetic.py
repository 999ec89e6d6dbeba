"""Multi-digit + - * with the pencil-and-paper steps (columns, carries, borrows).

Small by default (2-3 digit operands, single-digit multipliers) so that a tiny model trained
for minutes on a CPU can learn part of it; the knobs make it as hard as wanted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from seekforge.errors import ConfigError
from seekforge.tasks.base import Row, Task, check_int, final_line

_COLUMNS = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


def column_name(i: int) -> str:
    return _COLUMNS[i] if i < len(_COLUMNS) else f"10^{i}"


def digits_of(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def addition_steps(a: int, b: int) -> list[str]:
    da, db = digits_of(a), digits_of(b)
    width = max(len(da), len(db))
    da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
    return [f"{a} + {b}: add the columns from the right, carrying into the next column.",
            *_carried_columns([(x + y, f"{x} + {y}") for x, y in zip(da, db)]), f"{a} + {b} = {a + b}"]


def _carried_columns(columns: list[tuple[int, str]]) -> list[str]:
    """One line a column, from the right, for columns (value, terms) that carry into the next; then the last
    carry as the leading digit."""
    lines, carry = [], 0
    for i, (value, terms) in enumerate(columns):
        total = value + carry
        terms += f" + {carry}" if carry else ""
        carry = total // 10
        lines.append(f"{column_name(i)}: {terms} = {total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    if carry:
        lines.append(f"the carry {carry} becomes the leading digit")
    return lines


def subtraction_steps(a: int, b: int) -> list[str]:
    """Steps for a - b with a >= b >= 0."""
    da, db = digits_of(a), digits_of(b)
    lines = [f"{a} - {b}: subtract the columns from the right, borrowing when the top digit is smaller."]
    borrow = 0
    for i in range(len(da)):
        x, y = da[i], db[i] if i < len(db) else 0
        prefix = f"{x} - 1 = {x - 1} after the borrow; " if borrow else ""
        x -= borrow
        if x < y:
            lines.append(f"{column_name(i)}: {prefix}{x} < {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{column_name(i)}: {prefix}{x} - {y} = {x - y}")
            borrow = 0
    lines.append(f"{a} - {b} = {a - b}")
    return lines


def single_digit_product_steps(a: int, d: int) -> list[str]:
    return [f"{a} * {d}: multiply each digit by {d} from the right, carrying.",
            *_carried_columns([(x * d, f"{x} * {d}") for x in digits_of(a)]), f"{a} * {d} = {a * d}"]


def multiplication_steps(a: int, b: int) -> list[str]:
    if b < 10:
        return single_digit_product_steps(a, b)
    lines = [f"{a} * {b}: multiply {a} by each digit of {b}, shifted to its column, then add."]
    partials = []
    for i, d in enumerate(digits_of(b)):
        shifted = d * 10**i
        partials.append(a * shifted)
        lines.append(f"{a} * {shifted} = {a * shifted}")
    running = partials[0]
    for p in partials[1:]:
        lines.append(f"{running} + {p} = {running + p}")
        running += p
    lines.append(f"{a} * {b} = {a * b}")
    return lines


@dataclass
class ArithmeticTask(Task):
    """a OP b with OP from `ops`. Operands have min_digits..digits digits (min_digits defaults to
    digits - 1, so the default is 2-3 digits); the multiplier of * has 1..mul_digits digits.
    Subtraction keeps a >= b, so answers are never negative."""

    name = "arithmetic"
    digits: int = 3
    min_digits: int | None = None
    mul_digits: int = 1
    ops: str = "+-*"

    def __post_init__(self) -> None:
        check_int(self.name, "digits", self.digits, 1, 30)
        if self.min_digits is None:
            self.min_digits = max(1, self.digits - 1)
        check_int(self.name, "min_digits", self.min_digits, 1, self.digits)
        check_int(self.name, "mul_digits", self.mul_digits, 1, 30)
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set("+-*"):
            raise ConfigError(f"arithmetic: ops must be made of '+', '-', '*', got {self.ops!r}")

    def _operand(self, rng: random.Random, low_digits: int, high_digits: int) -> int:
        digits = rng.randint(low_digits, high_digits)
        # Single digits start at 2: adding 0 or multiplying by 1 teaches nothing.
        return rng.randint(10 ** (digits - 1) if digits > 1 else 2, 10**digits - 1)

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        op = rng.choice(sorted(set(self.ops)))
        a = self._operand(rng, self.min_digits, self.digits)
        if op == "*":
            b = self._operand(rng, 1, self.mul_digits)
            answer, steps = a * b, multiplication_steps(a, b)
        else:
            b = self._operand(rng, self.min_digits, self.digits)
            if op == "-":
                a, b = max(a, b), min(a, b)
                answer, steps = a - b, subtraction_steps(a, b)
            else:
                answer, steps = a + b, addition_steps(a, b)
        # + and * commute: "12 + 34" and "34 + 12" are one problem, so one split.
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        row = Row(
            task=self.name,
            prompt=f"What is {a} {op} {b}?",
            answer=str(answer),
            solution="\n".join([*steps, final_line(str(answer))]),
            meta={"a": a, "b": b, "op": op},
        )
        return key, row
