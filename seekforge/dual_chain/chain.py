"""The rule chain: solvers in order, the first that applies answers, every call bounded in time and memory.

    rules = RuleChain()                                   # arithmetic, units, algebra (+ TableSolver.from_file(...))
    rules.solve("What is 12 + 30?")  # Solution(answer="42", derivation="12 + 30 = 42", solver="arithmetic")

The solvers run in a long-lived worker process forked from the caller (seekforge.rewards.safe's pool):
a call past `timeout_s` returns None and its worker is killed and replaced, an allocation past
`max_memory_mb` fails inside the worker, and a solver that raises counts as not applying. So a question
built to make sympy hang costs at most `timeout_s`.
"""

from __future__ import annotations

from collections.abc import Sequence

from seekforge.dual_chain.algebra import AlgebraSolver
from seekforge.dual_chain.arithmetic import ArithmeticSolver
from seekforge.dual_chain.solver import MAX_QUESTION_CHARS, Solution, Solver
from seekforge.dual_chain.units import UnitSolver
from seekforge.errors import ConfigError
from seekforge.rewards.safe import SafeReward


def default_solvers() -> list[Solver]:
    """Arithmetic first (the cheapest and the most specific), then units, then algebra."""
    return [ArithmeticSolver(), UnitSolver(), AlgebraSolver()]


def _solution_or_none(value: object) -> Solution | None:
    if value is not None and not isinstance(value, Solution):
        raise TypeError(f"a solver returned {type(value).__name__}, expected a Solution or None")
    return value


class RuleChain:
    def __init__(self, solvers: Sequence[Solver] | None = None, *, timeout_s: float = 2.0,
                 max_memory_mb: int = 1024, isolation: str = "auto"):
        self.solvers = default_solvers() if solvers is None else list(solvers)
        bad = [type(s).__name__ for s in self.solvers if not isinstance(s, Solver)]
        if bad or not self.solvers:
            raise ConfigError(f"RuleChain needs one or more Solver instances, got {bad or 'none'}")
        for solver in self.solvers:
            solver.prepare()
        self._bounded = SafeReward(self._solve, timeout_s, isolation=isolation, max_workers=2, name="rule chain",
                                   result=_solution_or_none, max_memory_mb=max_memory_mb)

    def _solve(self, question: str) -> Solution | None:
        for solver in self.solvers:
            solution = solver.applies(question)
            if solution is not None:
                return solution
        return None

    def solve(self, question: str) -> Solution | None:
        """The first solver's answer to `question`; None where none applies, or the solvers took longer than
        the timeout, or failed."""
        if not isinstance(question, str) or not question.strip() or len(question) > MAX_QUESTION_CHARS:
            return None
        return self._bounded(question)

    @property
    def counters(self):
        """Calls, timeouts, crashes and errors so far (seekforge.rewards.safe.RewardCounters)."""
        return self._bounded.counters

    def close(self) -> None:
        self._bounded.close()
