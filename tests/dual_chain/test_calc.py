"""The in-chain calculator: which lines ask for a result, and what it inserts, token by token."""

from __future__ import annotations

import pytest

from seekforge.dual_chain import Calculator
from seekforge.dual_chain.calc import expression_before_equals, insertion_for


@pytest.mark.parametrize("line, insert", [
    ("ones: 7 + 8 =", " 15"),  # arithmetic's columns
    ("The packs hold 3 * 4 =", " 12"),  # word problems
    ("Left: 50 - 12 = ", "38"),  # the space is already there
    ("Each friend gets 12 / 3 =", " 4"),
    ("7 / 2 =", " 3.5"),
    ("(3 + 4) * 2 =", " 14"),
    ("<calc>12 + 30</calc>", " = 42"),
    ("<calc>2^10</calc>", " = 1024"),
    ("= 9 + 7", None),  # chain_sum's rewrite: no "=" at the end
    ("=", None),  # an "=" that opens a line
    ("x^2 + 1 =", None),  # the expression belongs to a variable
    ("2x + 3 =", None),
    ("a.5 + 1 =", None),
    ("7 =", None),  # a lone number
    ("3 + 4 <=", None), ("3 + 4 ==", None), ("3 + 4 !=", None),
    ("9**9**9 =", None),  # past the evaluator's limits
    ("1 / 0 =", None),
    ("<calc>__import__('os')</calc>", None),
    ("3 + 4 =  ", None),  # two spaces: the model has moved on
])
def test_what_a_line_asks_for(line, insert):
    assert insertion_for(line) == insert


def test_expression_before_equals():
    assert expression_before_equals("tens: 4 + 3 + 1 =") == "4 + 3 + 1"
    assert expression_before_equals("no equals here") is None


def test_the_calculator_inserts_after_the_token_that_asks(task_tokenizer):
    state = Calculator(task_tokenizer).start()
    text = "= 9 + 7\n12 + 30 ="
    ids = task_tokenizer.encode(text)
    inserted = [state.accept(t) for t in ids]
    assert all(not i for i in inserted[:-1])
    assert task_tokenizer.decode(inserted[-1]) == " 42"
    for t in inserted[-1]:  # the state reads the inserted tokens too, and asks for nothing more
        assert state.accept(t) == []
    assert state.calls == 1
