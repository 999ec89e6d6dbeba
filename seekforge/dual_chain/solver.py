"""What every solver of the rule chain is: `applies(question) -> Solution | None`.

A solver reads a question in plain text and either declines (None: the question is not its kind, or it
is malformed) or answers it exactly, with the derivation that got there. Solvers never `eval` text: each
parses with its own restricted parser and bounds its work before doing it; the chain runs them behind a
timeout and a memory cap as well (seekforge.dual_chain.chain), so one that would hang is cut off.

Adding a solver is one small class: subclass Solver, set `name`, write `applies`, and (if it imports
something heavy) `prepare`, then pass it to RuleChain([...]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import ClassVar

MAX_QUESTION_CHARS = 2000  # longer text is not a question a solver reads


@dataclass(frozen=True)
class Solution:
    answer: str  # the final answer, written as the built-in tasks write theirs ("42", "5/2", "x = 3")
    derivation: str  # how it was reached, for a reader ("12 + 30 = 42")
    solver: str  # the name of the solver that answered
    certainty: float = 1.0  # 1.0: exact; lower where the solver had to guess what the question meant

    def as_dict(self) -> dict:
        return asdict(self)


class Solver:
    name: ClassVar[str]

    def applies(self, question: str) -> Solution | None:
        """The exact answer to `question` with its derivation, or None where this solver does not apply."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Import and build what `applies` needs (a library, a registry) before the chain forks its workers,
        so that the workers share it and the first question costs no start-up time."""


def format_number(value: Fraction) -> str:
    """An exact number as an answer: an integer, a terminating decimal ("2.5") or a fraction ("1/3")."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    places = max(twos, fives)
    if d != 1 or places > 12:
        return f"{value.numerator}/{value.denominator}"
    scaled = abs(value.numerator) * 10**places // value.denominator
    whole, frac = divmod(scaled, 10**places)
    return f"{'-' if value < 0 else ''}{whole}.{str(frac).rjust(places, '0').rstrip('0')}"
