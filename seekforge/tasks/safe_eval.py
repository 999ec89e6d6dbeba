"""Exact evaluation of untrusted arithmetic (model output) without `eval`.

The text is screened character by character, parsed with `ast`, and walked by a small
interpreter over `Fraction`s that knows only numbers, + - * / // %, unary signs, parentheses
and (when allowed) ** with a small integer exponent. Every resource a hostile input could
exhaust has a limit checked *before* the work is done: text length, parenthesis depth, node
count, tree depth, the size of every literal and intermediate result, and the result of a
power (estimated from bit lengths before computing it). So `9**9**9`, a million parentheses
or a 10,000-digit literal fail in microseconds with `ExpressionError`, never hang.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from fractions import Fraction

from seekforge.errors import SeekforgeError

# Typographic operators models like to emit; mapped to ASCII before parsing.
_TRANSLATE = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"})
_ALLOWED_CHARS = frozenset("0123456789.+-*/%() \t")


class ExpressionError(SeekforgeError, ValueError):
    """The text is not an arithmetic expression we evaluate, or it exceeds a limit."""


@dataclass(frozen=True)
class Limits:
    """Resource limits; the defaults are generous for answers and tiny for attackers."""

    max_chars: int = 1000
    max_nodes: int = 400
    max_depth: int = 64
    max_digits: int = 100  # numerator and denominator of every value, in decimal digits
    max_exponent: int = 64  # |exponent| of **; the result must also respect max_digits


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Evaluation:
    value: Fraction
    literals: tuple[Fraction, ...]  # the numbers written in the text, in reading order


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def evaluate(text: str, *, allow_power: bool = False, limits: Limits = DEFAULT_LIMITS) -> Fraction:
    """The exact value of `text`; raises ExpressionError for anything else."""
    return evaluate_detailed(text, allow_power=allow_power, limits=limits).value


def evaluate_detailed(
    text: str, *, allow_power: bool = False, limits: Limits = DEFAULT_LIMITS
) -> Evaluation:
    """The value of `text` and the literals it uses (the countdown check needs both)."""
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string expression, got {type(text).__name__}")
    if len(text) > limits.max_chars:
        raise ExpressionError(f"expression is {len(text)} characters long; the limit is {limits.max_chars}")
    text = text.translate(_TRANSLATE).strip()
    if not text:
        raise ExpressionError("empty expression")
    bad = sorted({c for c in text if c not in _ALLOWED_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise ExpressionError(f"expression contains characters other than digits, + - * / % . ( ): {shown}")
    _check_paren_depth(text, limits.max_depth)
    if not allow_power and "**" in text:
        raise ExpressionError("'**' (power) is not allowed here")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not a valid arithmetic expression: {text[:60]!r}") from e
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > limits.max_nodes:
        raise ExpressionError(f"expression has {nodes} syntax nodes; the limit is {limits.max_nodes}")
    walker = _Walker(text, allow_power, limits)
    value = walker.eval(tree.body, 1)
    return Evaluation(value, tuple(walker.literals))


def _check_paren_depth(text: str, max_depth: int) -> None:
    depth = 0
    for c in text:
        if c == "(":
            depth += 1
            if depth > max_depth:
                raise ExpressionError(f"parentheses nest deeper than {max_depth}")
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise ExpressionError("unbalanced parentheses")
    if depth:
        raise ExpressionError("unbalanced parentheses")


class _Walker:
    def __init__(self, text: str, allow_power: bool, limits: Limits):
        self.text = text
        self.allow_power = allow_power
        self.limits = limits
        # Bound on |numerator| and denominator, compared as ints (cheap) instead of digit strings.
        self.bound = 10**limits.max_digits
        self.literals: list[Fraction] = []

    def eval(self, node: ast.AST, depth: int) -> Fraction:
        if depth > self.limits.max_depth:
            raise ExpressionError(f"expression nests deeper than {self.limits.max_depth}")
        if isinstance(node, ast.Constant):
            return self._literal(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.eval(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left = self.eval(node.left, depth + 1)
            right = self.eval(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                return self._checked(self._power(left, right))
            op = _BINARY.get(type(node.op))
            if op is None:
                raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
            if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                raise ExpressionError("division by zero")
            return self._checked(Fraction(op(left, right)))
        raise ExpressionError(f"{type(node).__name__} is not allowed in an arithmetic expression")

    def _literal(self, node: ast.Constant) -> Fraction:
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ExpressionError(f"literal {node.value!r} is not a number")
        # The source text, not the float, so that 0.1 is exactly 1/10.
        source = self.text[node.col_offset : node.end_col_offset]
        if len(source.replace(".", "")) > self.limits.max_digits:
            raise ExpressionError(f"number has more than {self.limits.max_digits} digits")
        value = Fraction(source)
        self.literals.append(value)
        return value

    def _power(self, base: Fraction, exponent: Fraction) -> Fraction:
        if not self.allow_power:
            raise ExpressionError("'**' (power) is not allowed here")
        if exponent.denominator != 1:
            raise ExpressionError("only integer exponents are allowed")
        e = abs(exponent.numerator)
        if e > self.limits.max_exponent:
            raise ExpressionError(f"exponent {exponent} exceeds the limit of {self.limits.max_exponent}")
        if base == 0 and exponent < 0:
            raise ExpressionError("division by zero")
        # Estimate the result's size from bit lengths before paying for it.
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) - 1
        if bits * e > self.bound.bit_length():
            raise ExpressionError(f"power result would exceed {self.limits.max_digits} digits")
        return base**exponent.numerator

    def _checked(self, value: Fraction) -> Fraction:
        if abs(value.numerator) >= self.bound or value.denominator >= self.bound:
            raise ExpressionError(f"an intermediate result exceeds {self.limits.max_digits} digits")
        return value
