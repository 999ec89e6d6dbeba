"""Sums (and optionally differences) of several small numbers, solved with running totals.

The worked solution rewrites the whole remaining expression after every step ("= 9 + 7 + 8"), so the next
operand always sits right after the running total on the line above: a small model learns to copy it
reliably, where picking the k-th term out of the question is a skill it acquires late and erratically."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from seekforge.errors import ConfigError
from seekforge.tasks.base import Row, Task, check_int, final_line


@dataclass
class ChainSumTask(Task):
    """min_terms..max_terms numbers from 1..max_value joined by operators from `ops`."""

    name = "chain_sum"
    min_terms: int = 3
    max_terms: int = 5
    max_value: int = 20
    ops: str = "+"

    def __post_init__(self) -> None:
        check_int(self.name, "min_terms", self.min_terms, 2, 100)
        check_int(self.name, "max_terms", self.max_terms, self.min_terms, 100)
        check_int(self.name, "max_value", self.max_value, 1, 10**12)
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set("+-"):
            raise ConfigError(f"chain_sum: ops must be made of '+' and '-', got {self.ops!r}")

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        terms = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_terms, self.max_terms))]
        ops = [rng.choice(sorted(set(self.ops))) for _ in terms[1:]]
        expression = _expression(terms, ops)
        solution, answer = _solve(terms, ops)
        row = Row(task=self.name, prompt=f"What is {expression}?", answer=answer, solution=solution,
                  meta={"terms": terms, "ops": ops})
        return expression, row

    def careless(self, row: Row, rng: random.Random) -> Row:
        """One running total off by 1 or 2, carried on to a wrong answer."""
        terms, ops = row.meta["terms"], row.meta["ops"]
        solution, answer = _solve(terms, ops, slip=(rng.randrange(len(ops)), rng.choice([-2, -1, 1, 2])))
        return replace(row, solution=solution, answer=answer)


def _expression(terms: list[int], ops: list[str]) -> str:
    """"7 + 2 - 4": terms[0], then each operator with the term after it."""
    return " ".join([str(terms[0]), *(f"{op} {t}" for op, t in zip(ops, terms[1:]))])


def _solve(terms: list[int], ops: list[str], slip: tuple[int, int] | None = None) -> tuple[str, str]:
    """The worked solution and its answer; `slip` = (step, error) adds `error` to that step's total."""
    lines, total = [_expression(terms, ops)], terms[0]
    for i, (op, t) in enumerate(zip(ops, terms[1:])):
        total = total + t if op == "+" else total - t
        if slip is not None and slip[0] == i:
            total += slip[1]
        lines.append("= " + _expression([total, *terms[i + 2:]], ops[i + 1:]))
    return "\n".join([*lines, final_line(str(total))]), str(total)
