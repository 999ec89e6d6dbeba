"""Algebra: equations in one to three single-letter variables ("Solve 2x + 3 = 11", "x^2 - 5x + 6 = 0",
"x + y = 10 and x - y = 2"), solved exactly by sympy.

The text never reaches sympy as a string (no sympify, no eval): a small recursive-descent parser reads
numbers, single-letter variables, + - * / ^, parentheses and implicit products (2x, 3(x + 1)) and builds
the sympy expressions itself, within limits on length, tokens, nesting, digits and exponents. What sympy
then does with a legal but hard system is bounded by the chain's timeout.
"""

from __future__ import annotations

import re
from fractions import Fraction

from seekforge.dual_chain.solver import MAX_QUESTION_CHARS, Solution, Solver, format_number

MAX_SIDE_CHARS = 200
MAX_TOKENS = 120
MAX_DEPTH = 24
MAX_DIGITS = 20
MAX_EXPONENT = 12
MAX_VARIABLES = 3
MAX_EQUATIONS = 3

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([a-zA-Z])|(\*\*|[-+*/^()]))")
# one side of an equation: numbers, single letters, operators, parentheses; a word of two letters ends it
_SIDE = r"(?:[\d.]+|\b[a-zA-Z]\b|(?<=\d)[a-zA-Z]\b|[-+*/^()\s]|\*\*)+"
_EQUATION = re.compile(rf"({_SIDE})=({_SIDE})")


class ParseError(ValueError):
    """The text is not an equation this parser reads, or it exceeds a limit."""


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary | unary)*  (juxtaposition multiplies);
    unary := ('+'|'-') unary | power; power := atom ('^' unary)?; atom := number | letter | '(' expr ')'."""

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        self.tokens = self._tokenize(text)
        self.i = 0
        self.symbols: dict[str, object] = {}

    @staticmethod
    def _tokenize(text: str) -> list[tuple[str, str]]:
        if len(text) > MAX_SIDE_CHARS:
            raise ParseError(f"more than {MAX_SIDE_CHARS} characters")
        out, pos, text = [], 0, text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ParseError(f"unexpected character {text[pos]!r}")
            number, letter, op = m.groups()
            if number is not None:
                if len(number.replace(".", "")) > MAX_DIGITS:
                    raise ParseError(f"a number with more than {MAX_DIGITS} digits")
                out.append(("num", number))
            elif letter is not None:
                out.append(("var", letter))
            else:
                out.append(("op", "^" if op == "**" else op))
            pos = m.end()
            if len(out) > MAX_TOKENS:
                raise ParseError(f"more than {MAX_TOKENS} tokens")
        return out

    def parse(self):
        if not self.tokens:
            raise ParseError("empty side")
        value = self.expr(0)
        if self.i != len(self.tokens):
            raise ParseError(f"unexpected {self.tokens[self.i][1]!r}")
        return value

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise ParseError("the expression ends too early")
        self.i += 1
        return token

    def expr(self, depth: int):
        if depth > MAX_DEPTH:
            raise ParseError(f"nests deeper than {MAX_DEPTH}")
        value = self.term(depth)
        while (t := self._peek()) is not None and t in (("op", "+"), ("op", "-")):
            self.i += 1
            right = self.term(depth)
            value = value + right if t[1] == "+" else value - right
        return value

    def term(self, depth: int):
        value = self.unary(depth)
        while (t := self._peek()) is not None:
            if t in (("op", "*"), ("op", "/")):
                self.i += 1
                right = self.unary(depth)
                if t[1] == "/" and right == 0:
                    raise ParseError("division by zero")
                value = value * right if t[1] == "*" else value / right
            elif t[0] in ("num", "var") or t == ("op", "("):  # 2x, x(x + 1), (x + 1)(x - 1)
                value = value * self.power(depth)
            else:
                break
        return value

    def unary(self, depth: int):
        t = self._peek()
        if t in (("op", "+"), ("op", "-")):
            self.i += 1
            if depth > MAX_DEPTH:
                raise ParseError(f"nests deeper than {MAX_DEPTH}")
            value = self.unary(depth + 1)
            return -value if t[1] == "-" else value
        return self.power(depth)

    def power(self, depth: int):
        base = self.atom(depth)
        if self._peek() == ("op", "^"):
            self.i += 1
            exponent = self.unary(depth + 1)
            if not (exponent.is_Integer and abs(int(exponent)) <= MAX_EXPONENT):
                raise ParseError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise ParseError("division by zero")
            return base**exponent
        return base

    def atom(self, depth: int):
        kind, text = self._take()
        if kind == "num":
            return self.sp.Rational(Fraction(text).numerator, Fraction(text).denominator)
        if kind == "var":
            return self.symbols.setdefault(text, self.sp.Symbol(text))
        if text == "(":
            value = self.expr(depth + 1)
            if self._take() != ("op", ")"):
                raise ParseError("unbalanced parentheses")
            return value
        raise ParseError(f"unexpected {text!r}")


def parse_equations(question: str):
    """[(left, right)] sympy expressions of the equations written in `question`, and their symbols."""
    sides = [(m.group(1), m.group(2)) for m in _EQUATION.finditer(question.replace("−", "-"))]
    if not sides or len(sides) > MAX_EQUATIONS:
        raise ParseError(f"one to {MAX_EQUATIONS} equations are read, found {len(sides)}")
    equations, symbols = [], {}
    for left, right in sides:
        pair = []
        for side in (left, right):
            parser = _Parser(side.strip().rstrip("."))
            pair.append(parser.parse())
            symbols.update(parser.symbols)
        equations.append(tuple(pair))
    if not symbols or len(symbols) > MAX_VARIABLES:
        raise ParseError(f"one to {MAX_VARIABLES} variables are solved for, found {len(symbols)}")
    return equations, symbols


def _show(value) -> tuple[str, bool]:
    """(the value as an answer, whether it is explicit: a rational or a radical, not an implicit root)."""
    import sympy

    if value.is_Rational:
        return format_number(Fraction(int(value.p), int(value.q))), True
    if value.free_symbols or value.has(sympy.CRootOf):  # implicit: shown as a decimal, not exact
        return str(sympy.N(value, 10)).replace("**", "^").replace("*I", "i"), False
    return str(value).replace("**", "^"), True


class AlgebraSolver(Solver):
    name = "algebra"

    def prepare(self) -> None:
        import sympy  # noqa: F401  (a second or so to import: before the workers fork, not in them)

    def applies(self, question: str) -> Solution | None:
        if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS or "=" not in question:
            return None
        import sympy

        try:
            equations, symbols = parse_equations(question)
        except (ParseError, ArithmeticError):
            return None
        names = sorted(symbols)
        unknowns = [symbols[n] for n in names]
        eqs = [sympy.Eq(left, right) for left, right in equations]
        # one equation goes alone: sympy.solve([eq], [x]) leaves out implicit roots that solve(eq, x) gives
        solutions = sympy.solve(eqs[0] if len(eqs) == 1 else eqs, unknowns[0] if len(unknowns) == 1 else unknowns,
                                dict=True)
        written = "; ".join(f"{sympy.sstr(left)} = {sympy.sstr(right)}" for left, right in equations).replace("**", "^")
        if not solutions:
            return Solution("no solution", f"{written} has no solution", self.name)
        exact = True
        if len(names) == 1:
            values = [s[unknowns[0]] for s in solutions if unknowns[0] in s]
            if len(values) != len(solutions):
                return None  # the variable is free: every value solves it
            shown = []
            for v in sorted(values, key=sympy.default_sort_key):
                text, ok = _show(v)
                shown.append(text)
                exact &= ok
            answer = ", ".join(shown)
            derivation = f"{written}  =>  {names[0]} = {' or '.join(shown)}"
        else:
            if len(solutions) != 1 or set(solutions[0]) != set(unknowns):
                return None  # several solutions or free variables: no single answer
            parts = []
            for name, u in zip(names, unknowns):
                text, ok = _show(solutions[0][u])
                parts.append(f"{name} = {text}")
                exact &= ok
            answer = ", ".join(parts)
            derivation = f"{written}  =>  {answer}"
        return Solution(answer, derivation, self.name, 1.0 if exact else 0.5)
