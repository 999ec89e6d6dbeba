"""Sums (and optionally differences) of several small numbers, solved with running totals."""

from __future__ import annotations

import random
from dataclasses import dataclass

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
        expression = " ".join([str(terms[0]), *(f"{op} {t}" for op, t in zip(ops, terms[1:]))])
        steps, total = [], terms[0]
        for op, t in zip(ops, terms[1:]):
            new = total + t if op == "+" else total - t
            steps.append(f"{total} {op} {t} = {new}")
            total = new
        answer = str(total)
        row = Row(
            task=self.name,
            prompt=f"What is {expression}?",
            answer=answer,
            solution="\n".join([*steps, final_line(answer)]),
            meta={"terms": terms, "ops": ops},
        )
        return expression, row
