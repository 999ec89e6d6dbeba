"""Arithmetic: the one expression a question asks about ("What is 12 + 30?", "Calculate (3 + 4) * 2"),
evaluated exactly by the tasks' bounded evaluator (seekforge.tasks.safe_eval: no eval, limits checked
before the work). Also `calc`, the in-chain calculator's evaluation of one expression."""

from __future__ import annotations

import re
from fractions import Fraction

from seekforge.dual_chain.solver import MAX_QUESTION_CHARS, Solution, Solver, format_number
from seekforge.tasks.safe_eval import ExpressionError, evaluate_detailed

# maximal runs of arithmetic characters that start and end with a number or a parenthesis
_RUN = re.compile(r"[-+−(]*[\d(][\d\s.+\-*/×÷−%()^]*[\d)]")
# a letter used as a variable next to arithmetic (2x, x^2, = y, (a + ...): an algebra question, not arithmetic
_VARIABLE = re.compile(r"\d[a-zA-Z]\b|\b[a-zA-Z]\s*[\^=+\-*/]|[=+\-*/^(]\s*[a-zA-Z]\b(?!['’])")


def calc(expression: str) -> Fraction | None:
    """The exact value of one arithmetic expression (`^` or `**` a small integer power), None where it is
    not one or exceeds the evaluator's limits."""
    try:
        return evaluate_detailed(expression.replace("^", "**"), allow_power=True).value
    except ExpressionError:
        return None


class ArithmeticSolver(Solver):
    name = "arithmetic"

    def applies(self, question: str) -> Solution | None:
        if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS or _VARIABLE.search(question):
            return None
        found = []
        for match in _RUN.finditer(question):
            text = match.group().strip()
            try:
                evaluation = evaluate_detailed(text.replace("^", "**"), allow_power=True)
            except ExpressionError:
                continue
            if len(evaluation.literals) >= 2:  # an operation, not a lone number
                found.append((text, evaluation.value))
        if len(found) != 1:  # none, or several: which one the question asks about is a guess
            return None
        text, value = found[0]
        answer = format_number(value)
        return Solution(answer, f"{text} = {answer}", self.name)
