"""Tasks: seeded, disjoint splits, correct gold answers and worked steps."""

import re
from fractions import Fraction

import pytest

from seekforge.errors import ConfigError
from seekforge.rewards import accuracy_reward, format_reward, r1_zero_prompt, row_fields
from seekforge.tasks import BUILTIN_TASKS, Row, get_task, list_tasks
from seekforge.tasks.countdown import check_countdown
from seekforge.tasks.safe_eval import evaluate

BUILTINS = ["arithmetic", "chain_sum", "countdown", "word_problem"]


def test_registry_names_and_errors():
    assert list(BUILTIN_TASKS) == BUILTINS
    names = list_tasks()
    assert names[:4] == BUILTINS and "rg:basic_arithmetic" in names
    for name in BUILTINS:
        assert get_task(name).name == name
    with pytest.raises(ConfigError, match="arithmetic, chain_sum, countdown, word_problem"):
        get_task("arithmetik")
    with pytest.raises(ConfigError, match="digits, min_digits, mul_digits, ops"):
        get_task("arithmetic", digit=3)
    with pytest.raises(ConfigError, match="digits"):
        get_task("arithmetic", digits=0)
    with pytest.raises(ConfigError, match="ops"):
        get_task("chain_sum", ops="*")
    with pytest.raises(ConfigError, match="split"):
        get_task("arithmetic").rows("validation", 3, 0)
    with pytest.raises(ConfigError, match="n must be"):
        get_task("arithmetic").rows("train", -1, 0)
    with pytest.raises(ConfigError, match="reasoning-gym dataset"):
        get_task("rg:no_such_dataset")


@pytest.mark.parametrize("name", BUILTINS)
def test_rows_are_deterministic_per_split_and_seed(name):
    task = get_task(name)
    a = task.rows("train", 50, seed=3)
    assert a == get_task(name).rows("train", 50, seed=3)
    assert a != task.rows("train", 50, seed=4)
    assert a != task.rows("test", 50, seed=3)
    assert all(isinstance(r, Row) and r.task == name for r in a)


def _problem(row: Row):
    """An identity for the maths of a row, computed from its text independently of the task code."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", row.prompt))
    if row.task == "countdown":
        return tuple(sorted(row.meta["numbers"])), row.meta["target"]
    if row.task == "word_problem":
        return row.meta["template"], numbers  # each template states its numbers in a fixed order
    if row.task == "arithmetic" and row.meta["op"] in "+*":
        return row.meta["op"], tuple(sorted(numbers))
    return row.prompt


@pytest.mark.parametrize("name", BUILTINS)
def test_train_and_test_never_share_a_problem(name):
    task = get_task(name)
    train = {_problem(r) for seed in (0, 1) for r in task.rows("train", 1000, seed)}
    test = {_problem(r) for r in task.rows("test", 1000, 0)}
    assert len(test) > 100 and len(train) > 100
    assert not train & test


def test_splits_stay_disjoint_when_the_problem_space_is_exhausted():
    # 1-digit + and * have only a few dozen problems: thousands of draws per split see every
    # problem of that split, so a leak would show.
    task = get_task("arithmetic", digits=1, ops="+*")
    train = {_problem(r) for r in task.rows("train", 3000, 0)}
    test = {_problem(r) for r in task.rows("test", 3000, 0)}
    assert not train & test
    assert len(train | test) == 2 * 36  # 8 digits 2..9: 36 unordered pairs per operator


def test_knobs_change_difficulty():
    rows = get_task("arithmetic", digits=5, ops="+").rows("train", 100, 0)
    assert all(4 <= len(str(r.meta["a"])) <= 5 and 4 <= len(str(r.meta["b"])) <= 5 for r in rows)
    rows = get_task("chain_sum", min_terms=6, max_terms=6, max_value=9).rows("train", 50, 0)
    assert all(len(r.meta["terms"]) == 6 and max(r.meta["terms"]) <= 9 for r in rows)
    rows = get_task("countdown", min_numbers=5, max_numbers=5).rows("train", 50, 0)
    assert all(len(r.meta["numbers"]) == 5 for r in rows)


# "2 * 5 + 1 = 11": a run of numbers and operators, then "=", then a number.
_EQUATION = re.compile(r"(?<![\d*/+-] )(-?\d+(?: [-+*/] \d+)+) = (-?\d+)")


def _equations(solution: str) -> list[tuple[str, str]]:
    """(expression, value) pairs the steps claim; chain sums rewrite the expression line by line, each
    line ("= 9 + 7 + 8") equal to the first."""
    lines = solution.splitlines()
    if len(lines) > 2 and lines[1].startswith("= "):
        return [(lines[0], str(evaluate(line[2:]))) for line in lines[1:-1]]
    return _EQUATION.findall(solution)


@pytest.mark.parametrize("name", BUILTINS)
def test_gold_answers_and_worked_steps_are_right(name):
    rows = get_task(name).rows("train", 300, 0) + get_task(name).rows("test", 300, 0)
    prompt = r1_zero_prompt("q")
    for row in rows:
        assert row.solution.splitlines()[-1] == f"So the answer is {row.answer}."
        # Every equation written in the steps is true.
        equations = _equations(row.solution)
        assert equations
        for expression, value in equations:
            assert evaluate(expression) == int(value), (row.solution, expression, value)
        # The gold, written the way the model is asked to, earns full accuracy and format reward.
        completion = f"{row.solution}</think> <answer>{row.answer}</answer>"
        assert accuracy_reward(prompt, completion, **row_fields(row)) == 1.0, row
        assert format_reward(prompt, completion, **row_fields(row)) == 1.0
        assert accuracy_reward(prompt, f"\\boxed{{{row.answer}}}", **row_fields(row)) == 1.0
        assert accuracy_reward(prompt, "<answer>-98765</answer>", **row_fields(row)) == 0.0


def test_careless_chain_sum_makes_one_slip_and_carries_it_on():
    import random

    task = get_task("chain_sum", ops="+-")
    rng = random.Random(0)
    for row in task.rows("train", 200, 0):
        slipped = task.careless(row, rng)
        assert (slipped.prompt, slipped.meta) == (row.prompt, row.meta)
        assert 1 <= abs(int(slipped.answer) - int(row.answer)) <= 2
        assert slipped.solution.splitlines()[-1] == f"So the answer is {slipped.answer}."
        old, new = row.solution.splitlines(), slipped.solution.splitlines()
        first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        assert old[:first] == new[:first] and first >= 1  # the question line is copied right
        # the steps after the slip add up from the wrong total: every later line differs by the same error
        diffs = {evaluate(n[2:]) - evaluate(o[2:]) for o, n in zip(old[first:-1], new[first:-1])}
        assert diffs == {int(slipped.answer) - int(row.answer)}
    assert get_task("arithmetic").careless(get_task("arithmetic").rows("train", 1, 0)[0], rng) is None


def test_arithmetic_and_chain_sum_answers_match_an_independent_evaluation():
    rows = get_task("arithmetic", mul_digits=2).rows("train", 300, 1)
    rows += get_task("chain_sum", ops="+-").rows("train", 300, 1)
    for row in rows:
        expression = row.prompt.removeprefix("What is ").removesuffix("?")
        assert Fraction(int(row.answer)) == evaluate(expression)


def test_countdown_gold_uses_every_number_and_reaches_the_target():
    for row in get_task("countdown").rows("train", 300, 2):
        numbers, target = row.meta["numbers"], row.meta["target"]
        assert evaluate(row.answer) == target and target not in numbers
        assert sorted(int(n) for n in re.findall(r"\d+", row.answer)) == sorted(numbers)
        assert check_countdown(row.answer, numbers, target)


def test_reasoning_gym_tasks_are_seeded_disjoint_and_scored_by_their_checker():
    task = get_task("rg:basic_arithmetic", min_terms=2, max_terms=3)
    train = task.rows("train", 200, 0)
    test = task.rows("test", 100, 0)
    assert train == get_task("rg:basic_arithmetic", min_terms=2, max_terms=3).rows("train", 200, 0)
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    row = test[0]
    assert accuracy_reward("", f"<answer>{row.answer}</answer>", **row_fields(row)) == 1.0
    assert accuracy_reward("", f"<answer>{int(row.answer) + 1}</answer>", **row_fields(row)) == 0.0
    with pytest.raises(ConfigError, match="invalid config"):
        get_task("rg:basic_arithmetic", no_such_option=1)


_COLUMN = re.compile(r"^[\w-]+: (\d+) ([+*]) (\d+)(?: \+ (\d+))? = (\d+), write (\d)(?: carry (\d+))?$")


def test_column_steps_carry_correctly_and_spell_the_answer():
    rows = get_task("arithmetic", ops="+*").rows("train", 400, 5)
    for row in rows:
        written, carry_out = [], 0
        for line in row.solution.splitlines():
            match = _COLUMN.match(line)
            if not match:
                continue
            _, _, _, carry_in, total, digit, carry = match.groups()
            assert int(carry_in or 0) == carry_out, row.solution  # the carry arrives where it was sent
            assert int(total) % 10 == int(digit) and int(total) // 10 == int(carry or 0), row.solution
            written.append(digit)
            carry_out = int(carry or 0)
        assert written, row.solution
        leading = str(carry_out) if carry_out else ""
        assert leading + "".join(reversed(written)) == row.answer, row.solution
