"""The in-chain calculator: as the model writes an arithmetic expression in a marked form, the rule chain
computes it and the exact result is inserted into the generation (an engine inserter,
seekforge.engine.insertion: a tool call inside the batch, other sequences unaffected).

Two marked forms, checked at every token against the current line of output:
- the built-in tasks' form: an expression followed by "=" ("3 * 4 =", "ones: 7 + 8 + 1 =") gets " 12" /
  " 16" -- what every worked solution of seekforge.tasks writes after it. An "=" that opens a line
  (chain_sum's "= 9 + 7") or follows a variable ("2x + 3 =") has no expression before it and gets nothing;
- explicit tags: "<calc>12 + 30</calc>" gets " = 42".
Evaluation is the tasks' bounded evaluator (no eval; limits checked before the work), so it never stalls a step.
"""

from __future__ import annotations

import re

from seekforge.dual_chain.arithmetic import calc
from seekforge.dual_chain.solver import format_number

OPEN_TAG, CLOSE_TAG = "<calc>", "</calc>"
WINDOW = 64  # tokens of the current line kept: an expression longer than this line tail is not computed
_TAIL = re.compile(r"[-+−(]*[\d(][\d\s.+\-*/×÷−%()^]*[\d)]\s*$")


def expression_before_equals(line: str) -> str | None:
    """The arithmetic expression that a line ending in "=" (or "= ") has just asked for, None where there is none."""
    body = line.rstrip(" ")
    if not body.endswith("=") or len(line) - len(body) > 1 or body[-2:-1] in ("<", ">", "=", "!"):
        return None
    m = _TAIL.search(body[:-1])
    if m is None:
        return None
    before = body[:m.start()][-1:]
    if before and (before.isalnum() or before in "^*/._)"):  # "x^2 + 1 =", "2x + 3 =": not an arithmetic expression
        return None
    return m.group().strip()


def insertion_for(line: str) -> str | None:
    """The text to insert after `line`, the current line of output, or None."""
    if line.endswith(CLOSE_TAG):
        start = line.rfind(OPEN_TAG)
        if start < 0:
            return None
        value = calc(line[start + len(OPEN_TAG):-len(CLOSE_TAG)])
        return None if value is None else f" = {format_number(value)}"
    expression = expression_before_equals(line)
    if expression is None:
        return None
    value = calc(expression)
    if value is None or len(re.findall(r"\d+(?:\.\d+)?", expression)) < 2:  # a lone number is not a calculation
        return None
    return ("" if line.endswith(" ") else " ") + format_number(value)


class Calculator:
    """An engine inserter (SamplingParams(inserter=Calculator(tokenizer))): one state a sequence."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def start(self) -> _CalculatorState:
        return _CalculatorState(self.tokenizer)


class _CalculatorState:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the tail of the current line, as token ids
        self.calls = 0  # insertions made
        self.inserting = 0  # tokens of the last insertion still to come back through accept

    def accept(self, token: int) -> list[int]:
        self.ids.append(token)
        if len(self.ids) > WINDOW:
            del self.ids[:len(self.ids) - WINDOW]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if "\n" in text:  # keep from the token that holds the last newline on
            while len(self.ids) > 1 and "\n" in self.tokenizer.decode(self.ids[1:], skip_special_tokens=True):
                del self.ids[0]
            text = text[text.rfind("\n") + 1:]
        if self.inserting:  # a token of our own insertion: read, never answered (" 42" passes "= " on the way)
            self.inserting -= 1
            return []
        insert = insertion_for(text)
        if insert is None:
            return []
        self.calls += 1
        tokens = self.tokenizer.encode(insert)
        self.inserting = len(tokens)
        return tokens
