"""Each solver of the rule chain on ordinary, hard and malformed questions, against hand-computed answers
(and sympy's solutions checked by substitution); none of them evaluates the question's text."""

from __future__ import annotations

import builtins
import time
from fractions import Fraction

import pytest

from seekforge.dual_chain import AlgebraSolver, ArithmeticSolver, TableSolver, UnitSolver, load_table
from seekforge.dual_chain.solver import format_number
from seekforge.errors import DataError


@pytest.mark.parametrize("question, answer", [
    ("What is 12 + 30?", "42"),
    ("What is 7 + 2 - 4?", "5"),  # chain_sum's form
    ("What is 345 * 7?", "2415"),  # arithmetic's form
    ("Calculate -5 * -6 + 3 =", "33"),
    ("What is (3 + 4) * 2?", "14"),
    ("What is 7 / 2?", "3.5"),
    ("What is 1 / 3 + 1 / 6?", "0.5"),
    ("What is 2 / 3?", "2/3"),
    ("What is 2^10?", "1024"),
    ("What is 0.1 + 0.2?", "0.3"),  # exact, not 0.30000000000000004
])
def test_arithmetic_answers(question, answer):
    solution = ArithmeticSolver().applies(question)
    assert solution is not None and solution.answer == answer and solution.certainty == 1.0
    assert solution.derivation.endswith(f"= {answer}")


@pytest.mark.parametrize("question", [
    "Solve 2x + 3 = 11",  # algebra, not 2 + 3
    "Find x if x^2 - 5x + 6 = 0",
    "What is 3 + 4? And 5 * 6?",  # two expressions: which one is asked is a guess
    "Using the numbers 3, 5, 7, write an expression that equals 19. You may use +, -, *, / and parentheses.",
    "Ava has 12 apples. She buys 3 packs with 4 apples in each pack. How many apples does Ava have now?",
    "What is 9**9**9**9?",  # a power past the evaluator's limits
    "What is " + "(" * 5000 + "1" + ")" * 5000 + "?",
    "What is 1" + "0" * 3000 + " + 1?",
    "What is 1 / 0?",
    "What is __import__('os').system('true') + 1?",
    "", "   ", "x" * 10_000,
])
def test_arithmetic_declines_what_it_cannot_answer_exactly(question):
    start = time.perf_counter()
    assert ArithmeticSolver().applies(question) is None
    assert time.perf_counter() - start < 2.0  # limits are checked before the work (a busy host is slower)


def _substitute(question_sides, variable, value):
    import sympy

    x = sympy.Symbol(variable)
    return [sympy.simplify(left.subs(x, value) - right.subs(x, value)) for left, right in question_sides]


@pytest.mark.parametrize("question, answer", [
    ("Solve 2x + 3 = 11.", "4"),
    ("Solve for x: 3(x - 2) = 2x + 5", "11"),
    ("Find x if x^2 - 5x + 6 = 0", "2, 3"),
    ("x/4 + 1 = 3", "8"),
    ("What is y when 0.5y - 1 = 2?", "6"),
    ("x + y = 10 and x - y = 2", "x = 6, y = 4"),
    ("x = x + 1", "no solution"),
])
def test_algebra_answers_checked_by_hand(question, answer):
    solution = AlgebraSolver().applies(question)
    assert solution is not None and solution.answer == answer and solution.certainty == 1.0


def test_algebra_roots_satisfy_the_equation():
    import sympy

    x = sympy.Symbol("x")
    solution = AlgebraSolver().applies("x^3 - 2x = 1")
    roots = [sympy.sympify(r.replace("^", "**")) for r in solution.answer.split(", ")]  # our own output, not input
    assert len(roots) == 3 and all(abs(complex(sympy.N(r**3 - 2 * r - 1))) < 1e-9 for r in roots)
    implicit = AlgebraSolver().applies("x^5 - x + 1 = 0")  # no radicals: decimals, not exact
    assert implicit.certainty < 1.0
    real = [float(r) for r in implicit.answer.split(", ") if "i" not in r]
    assert len(real) == 1 and abs(real[0] ** 5 - real[0] + 1) < 1e-8
    del x


@pytest.mark.parametrize("question", [
    "What is 12 + 30?",  # no equation
    "import os = 3",
    "__import__('os').system('true') = x",
    "x.__class__ = 1",
    "x^99999 = 1",  # exponent past the limit
    "x^(1/2) = 3",  # non-integer exponent
    "x = " + "(x + " * 60 + "1" + ")" * 60,  # nesting past the limit
    "x = 1" + "0" * 40,  # a number past the digit limit
    "a + b + c + d = 1",  # four variables
    "x = 1 and y = 2 and z = 3 and w = 4",  # four equations
    "x / 0 = 1",
    "2 = 2",
    "x + y = 3",  # free variable: no single answer
])
def test_algebra_declines_malformed_and_hostile_input(question):
    assert AlgebraSolver().applies(question) is None  # those past a limit fail in the parser, before sympy


def test_no_solver_evaluates_the_question_text(monkeypatch):
    """eval/exec never see the question, and sympy's string parsers are never called."""
    import sympy
    import sympy.parsing.sympy_parser as sympy_parser

    seen = []
    for name in ("eval", "exec"):
        real = getattr(builtins, name)

        def spy(source, *args, _real=real, _name=name, **kwargs):
            if isinstance(source, str):
                seen.append((_name, source))
            return _real(source, *args, **kwargs)

        monkeypatch.setattr(builtins, name, spy)

    def refuse(*args, **kwargs):
        raise AssertionError("a string parser of sympy was called")

    monkeypatch.setattr(sympy, "sympify", refuse)
    monkeypatch.setattr(sympy, "parse_expr", refuse)
    monkeypatch.setattr(sympy_parser, "parse_expr", refuse)
    questions = ["Solve 3(x - 2) = 2x + 5", "x + y = 10 and x - y = 2", "What is (3 + 4) * 2?",
                 "Convert 5 km to miles", "What is the capital of France?"]
    table = TableSolver({"France": {"capital": "Paris"}})
    answers = [s.applies(q) for q, s in zip(questions, [AlgebraSolver(), AlgebraSolver(), ArithmeticSolver(),
                                                         UnitSolver(), table])]
    assert [a.answer for a in answers] == ["11", "x = 6, y = 4", "14", "3.106855961", "Paris"]
    assert not [source for _, source in seen if any(q[:8] in source for q in questions)]


@pytest.mark.parametrize("question, answer", [
    ("Convert 5 km to miles", 5 / 1.609344),  # the international mile is 1.609344 km exactly
    ("How many feet are in 3 meters?", 3 / 0.3048),
    ("100 degC in degF", 212.0),
    ("Convert 20 degrees Celsius to Fahrenheit", 68.0),
    ("What is 2 hours in minutes?", 120.0),
    ("Convert 36 km/h to m/s", 10.0),
    ("How many grams are in 2.5 kg?", 2500.0),
])
def test_units_against_the_definitions(question, answer):
    solution = UnitSolver().applies(question)
    assert solution is not None and abs(float(solution.answer) - answer) <= 1e-9 * abs(answer)


@pytest.mark.parametrize("question", [
    "Convert 5 km to kg",  # dimensions differ
    "Convert 5 __import__ to m",
    "Convert 5 m to __class__",
    "Convert 1e999 m to km",  # overflows to inf
    "Convert 5 " + "meter " * 30 + "to km",
    "How many apples are in 3 boxes?",
    "What is 12 + 30?",
])
def test_units_decline_what_is_not_a_conversion(question):
    assert UnitSolver().applies(question) is None


def test_table_lookups_csv_and_json(tmp_path):
    csv_file = tmp_path / "countries.csv"
    csv_file.write_text("country,capital,population_millions\nFrance,Paris,68\nNew Zealand,Wellington,5.1\n"
                        "Zealand,Soro,0.8\n", encoding="utf-8")
    solver = TableSolver.from_file(csv_file)
    assert solver.applies("What is the capital of France?").answer == "Paris"
    assert solver.applies("What is the capital of New Zealand?").answer == "Wellington"  # the longer name wins
    assert solver.applies("what is the POPULATION MILLIONS of france").answer == "68"
    assert solver.applies("What is France?") is None  # two value columns: which one?
    assert solver.applies("What is the capital of Germany?") is None
    assert solver.applies("Compare the capital of France and New Zealand") is None  # two rows
    json_file = tmp_path / "symbols.json"
    json_file.write_text('{"Carbon": {"symbol": "C"}, "Oxygen": {"symbol": "O"}}', encoding="utf-8")
    elements = TableSolver.from_file(json_file)
    assert elements.applies("Carbon?").answer == "C"  # one value column: the row is enough
    listed = tmp_path / "list.json"
    listed.write_text('[{"name": "Mars", "moons": 2}, {"name": "Earth", "moons": 1}]', encoding="utf-8")
    assert TableSolver.from_file(listed).applies("How many moons has Mars?").answer == "2"


@pytest.mark.parametrize("name, content, problem", [
    ("missing.csv", None, "does not exist"),
    ("t.txt", "a,b\n1,2\n", "use a .csv or .json"),
    ("t.json", "{not json", "cannot be read"),
    ("t.json", "[]", "holds no rows"),
    ("t.json", '[1, 2]', "holds no rows"),
    ("t.csv", "", "holds no rows"),
    ("t.csv", "name,value\n,3\n", "has no 'name'"),
])
def test_bad_tables_name_the_problem(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=problem):
        load_table(path)


@pytest.mark.parametrize("value, text", [
    (Fraction(42), "42"), (Fraction(-7, 2), "-3.5"), (Fraction(1, 8), "0.125"), (Fraction(1, 3), "1/3"),
    (Fraction(-1, 40), "-0.025"), (Fraction(7, 1), "7"),
])
def test_numbers_are_written_as_the_tasks_write_them(value, text):
    assert format_number(value) == text
