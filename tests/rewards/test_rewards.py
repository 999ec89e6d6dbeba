"""Rewards and the safe evaluator, including what an adversarial completion can throw at them."""

import os
import threading
import time
from fractions import Fraction

import pytest

from seekforge.errors import ConfigError
from seekforge.rewards import (
    accuracy_reward,
    extract_answer,
    format_reward,
    length_penalty,
    load_reward_functions,
    r1_zero_prompt,
    repetition_penalty,
    safe_reward,
)
from seekforge.tasks.countdown import check_countdown
from seekforge.tasks.safe_eval import ExpressionError, Limits, evaluate, evaluate_detailed

PROMPT = r1_zero_prompt("What is 345 + 789?")


def _short(value):
    return repr(value)[:30]


# ---------------------------------------------------------------- safe evaluator

def test_safe_eval_is_exact_and_follows_precedence():
    assert evaluate("345 + 789") == 1134
    assert evaluate("2 + 3 * (4 - 1)") == 11
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)
    assert evaluate("7 / 2") == Fraction(7, 2)
    assert evaluate("7 // 2 + 7 % 2") == 4
    assert evaluate("-(-3) - -2 + +1") == 6
    assert evaluate("6 × 7 − 2 ÷ 2") == 41  # typographic operators
    assert evaluate("2 ** 10", allow_power=True) == 1024
    assert evaluate("2 ** -2", allow_power=True) == Fraction(1, 4)
    assert evaluate_detailed("(8 - 3) * 2 + 8").literals == (8, 3, 2, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("9**9**9", "not allowed"),  # power is off unless asked for
        ("10**99 * 10**99", "not allowed"),
        ("(" * 100_000 + "1" + ")" * 100_000, "characters long"),
        ("(" * 400 + "1" + ")" * 400, "nest deeper"),
        ("-" * 900 + "1", "nest deeper|syntax nodes"),
        ("1" + "+1" * 400, "syntax nodes"),
        ("9" * 101, "more than 100 digits"),
        ("99999999999999999999" + " * 99999999999999999999" * 5, "exceeds 100 digits"),
        ("1 / 0", "division by zero"),
        ("5 % (2 - 2)", "division by zero"),
        ("１２ + 3", "characters other than"),
        ("٣ + 1", "characters other than"),
        ("__import__('os').system('true')", "characters other than"),
        ("1e999", "characters other than"),
        ("1 +", "not a valid"),
        ("(1 + 2", "unbalanced"),
        ("1 < 2", "characters other than"),
        ("", "empty"),
        ("   ", "empty"),
    ],
    ids=_short,
)
def test_safe_eval_rejects_hostile_input_quickly(text, message):
    start = time.perf_counter()
    with pytest.raises(ExpressionError, match=message):
        evaluate(text)
    assert time.perf_counter() - start < 0.5


def test_safe_eval_power_limits():
    with pytest.raises(ExpressionError, match="exponent"):
        evaluate("9**9**9", allow_power=True)
    with pytest.raises(ExpressionError, match="exceed"):
        evaluate("(10**50)**60", allow_power=True)
    with pytest.raises(ExpressionError, match="integer exponents"):
        evaluate("4 ** (1/2)", allow_power=True)
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate("0 ** -1", allow_power=True)
    assert evaluate("1 + 2 + 3", limits=Limits(max_chars=10)) == 6
    with pytest.raises(ExpressionError, match="limit is 10"):
        evaluate("1+2+3+4+5+6", limits=Limits(max_chars=10))
    with pytest.raises(ExpressionError):
        evaluate(12)  # not a string


def test_countdown_check():
    numbers, target = [3, 5, 8, 2], 19
    assert check_countdown("8 * 3 - 5", numbers, target)
    assert check_countdown("(8 * 3) - 5 = 19", numbers, target)
    assert check_countdown("8*2+3", numbers, target)  # a subset is fine
    assert not check_countdown("8 * 3 - 5 = 20", numbers, target)
    assert not check_countdown("8 + 8 + 3", numbers, target)  # 8 used twice
    assert not check_countdown("19", numbers, target)  # 19 is not given
    assert not check_countdown("8 * 3 - 5 + 0", numbers, target)  # 0 is not given
    assert not check_countdown("8 * 2 + 2.5 + 0.5", numbers, target)
    assert not check_countdown("8 * 3 - 4", numbers, target)
    assert not check_countdown("9**9**9", numbers, target)
    assert not check_countdown("", numbers, target) and not check_countdown(None, numbers, target)
    assert check_countdown("3 + 3", [3, 3, 1], 6) and not check_countdown("3 + 3 + 3", [3, 3, 1], 9)
    assert check_countdown("(5 - 2 / 8) * 8", [5, 2, 8, 8], 38)  # exact fractions in between


# ---------------------------------------------------------------- extraction and accuracy

def test_extract_answer_takes_the_last_answer():
    assert extract_answer("<think>x</think><answer> 12 </answer>") == "12"
    assert extract_answer("<answer>1</answer> wait <answer>2</answer>") == "2"
    assert extract_answer("<answer>\\boxed{7}</answer>") == "7"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and finally \\boxed{3}") == "3"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("<answer>5</answer> then \\boxed{6}") == "5"  # tags win over boxes
    assert extract_answer("the answer is 5") is None
    assert extract_answer("<answer>5") is None and extract_answer("\\boxed{5") is None
    assert extract_answer("") is None and extract_answer(None) is None


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<think>carry the ones</think> <answer>1134</answer>", 1.0),
        ("<answer>1,134</answer>", 1.0),
        ("<answer>$1134$</answer>", 1.0),
        ("<answer>1134.</answer>", 1.0),
        ("<answer>1134.0</answer>", 1.0),
        ("<answer>1134 apples</answer>", 1.0),
        ("\\boxed{1134}", 1.0),
        ("<answer>1135</answer> no wait <answer>1134</answer>", 1.0),  # the last answer counts
        ("<answer>1134</answer> no wait <answer>1135</answer>", 0.0),
        ("<answer>345 + 789</answer>", 0.0),  # restating the question is not answering it
        ("<answer>2268/2</answer>", 0.0),
        ("<answer>1134 or 1135</answer>", 0.0),
        ("1134", 0.0),  # no <answer> and no \boxed
        ("<think>1134", 0.0),
        ("", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>１１３４</answer>", 0.0),
        ("<answer>" + "(" * 5000 + "1134" + ")" * 5000 + "</answer>", 0.0),
        ("<answer>9**9**9</answer>", 0.0),
        ("<answer>$9^{9^{9}}$</answer>", 0.0),
        ("<answer>" + "9" * 100_000 + "</answer>", 0.0),
        ("<answer>" * 10_000, 0.0),
        ("\\boxed{" * 10_000, 0.0),
        ("<answer>" * 10_000 + "1134</answer>", 1.0),
    ],
    ids=_short,
)
def test_accuracy_reward_numeric(completion, reward):
    start = time.perf_counter()
    assert accuracy_reward(PROMPT, completion, answer="1134") == reward
    assert time.perf_counter() - start < 1.0


def test_accuracy_reward_latex_text_and_unjudgeable():
    assert accuracy_reward("", "<answer>\\frac{\\sqrt{3}}{2}</answer>", answer="\\frac{\\sqrt 3}{2}") == 1.0
    assert accuracy_reward("", "\\boxed{\\dfrac{\\sqrt{3}}{2}}", answer="\\frac{\\sqrt{3}}{2}") == 1.0
    assert accuracy_reward("", "<answer>\\sqrt{2}</answer>", answer="\\frac{\\sqrt{3}}{2}") == 0.0
    assert accuracy_reward("", "<answer>x^2 + 2x + 1</answer>", answer="(x+1)^2") == 1.0
    for hostile in ("$2^{2^{2^{2^{2}}}}$", "10^{100000}", "99999!", "x" * 5000, "((9^{999})^{999})^{999}",
                    "\\left(9^{999}\\right)^{999}", "\\binom{99999}{50000}"):
        start = time.perf_counter()
        assert accuracy_reward("", f"<answer>{hostile}</answer>", answer="\\sqrt{2}") == 0.0
        assert time.perf_counter() - start < 1.0
    assert accuracy_reward("", "<answer>3/4</answer>", answer="0.75") == 1.0
    assert accuracy_reward("", "<answer>\\frac{3}{4}</answer>", answer="3/4") == 1.0
    # Words compare exactly (math-verify would call "yes" and "sey" equal products of symbols).
    assert accuracy_reward("", "<answer>Paris</answer>", answer="Paris") == 1.0
    assert accuracy_reward("", "<answer>paris</answer>", answer="Paris") == 0.0
    assert accuracy_reward("", "<answer>yes</answer>", answer="sey") == 0.0
    # No gold, no judgement.
    assert accuracy_reward("", "<answer>4</answer>") is None
    assert accuracy_reward("", "<answer>4</answer>", answer="  ") is None
    assert accuracy_reward("", "<answer>4</answer>", task="countdown", meta={}) is None
    # Unknown task names fall back to the gold comparison.
    assert accuracy_reward("", "<answer>4</answer>", task="gsm8k", answer="4") == 1.0


def test_accuracy_reward_countdown_uses_the_checker():
    fields = {"task": "countdown", "answer": "8 * 3 - 5", "meta": {"numbers": [3, 5, 8, 2], "target": 19}}
    assert accuracy_reward("", "<answer>8*2 + 3</answer>", **fields) == 1.0  # not the gold, still right
    assert accuracy_reward("", "<answer>8 + 8 + 3</answer>", **fields) == 0.0
    assert accuracy_reward("", "<answer>19</answer>", **fields) == 0.0
    assert accuracy_reward("", "<answer>" + "(" * 300 + "19" + ")" * 300 + "</answer>", **fields) == 0.0


def test_accuracy_reward_works_off_the_main_thread():
    # math-verify's own timeout needs the main thread; we must not trip over it elsewhere.
    out = []
    worker = threading.Thread(target=lambda: out.append(
        accuracy_reward("", "<answer>\\frac{1}{\\sqrt{2}}</answer>", answer="\\frac{\\sqrt{2}}{2}")))
    worker.start()
    worker.join()
    assert out == [1.0]


# ---------------------------------------------------------------- format

@pytest.mark.parametrize(
    "prompt, completion, reward",
    [
        ("Q", "<think>a</think> <answer>4</answer>", 1.0),
        ("Q", "<think>\nmulti\nline\n</think>\n<answer>\n4\n</answer>\n", 1.0),
        (PROMPT, " reasoning </think> <answer>4</answer>", 1.0),  # the prompt opened <think>
        (PROMPT, "<think>reasoning</think><answer>4</answer>", 1.0),
        ("Q", " reasoning </think> <answer>4</answer>", 0.0),  # nobody opened <think>
        ("Q", "<think>a</think>", 0.0),
        ("Q", "<answer>4</answer>", 0.0),
        ("Q", "<think>a</think> <answer> </answer>", 0.0),
        ("Q", "<think>a</think> <answer>4</answer> trailing text", 0.0),
        ("Q", "<think>a</think> <answer>4</answer><answer>5</answer>", 0.0),
        ("Q", "<think>a <think> b</think> <answer>4</answer>", 0.0),
        ("Q", "<answer>4</answer><think>a</think>", 0.0),
        ("Q", "", 0.0),
        ("Q", "<think>" * 10_000, 0.0),
        ("Q", "<think>a</think><answer>" * 10_000, 0.0),
    ],
    ids=_short,
)
def test_format_reward_tags(prompt, completion, reward):
    assert format_reward(prompt, completion) == reward


def test_format_reward_options():
    assert format_reward("Q", " a </think> <answer>4</answer>", think_opened=True) == 1.0
    assert format_reward(PROMPT, " a </think> <answer>4</answer>", think_opened=False) == 0.0
    assert format_reward("Q", "so \\boxed{4}", style="boxed") == 1.0
    assert format_reward("Q", "so \\boxed{}", style="boxed") == 0.0
    assert format_reward("Q", "<answer>4</answer>", style="boxed") == 0.0
    with pytest.raises(ConfigError, match="style"):
        format_reward("Q", "x", style="xml")


def test_r1_zero_prompt():
    prompt = r1_zero_prompt("What is 2 + 2?")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert "<think> </think> and <answer> </answer> tags" in prompt
    assert prompt.endswith("User: What is 2 + 2?\nAssistant: <think>")


# ---------------------------------------------------------------- shaping

def test_length_penalty_is_dapo_overlong_shaping():
    kw = {"max_length": 100, "buffer": 20}
    assert length_penalty("", "x" * 80, **kw) == 0.0
    assert length_penalty("", "x" * 90, **kw) == pytest.approx(-0.5)
    assert length_penalty("", "x" * 100, **kw) == pytest.approx(-1.0)
    assert length_penalty("", "x" * 101, **kw) == -1.0
    assert length_penalty("", "short", completion_length=95, **kw) == pytest.approx(-0.75)
    with pytest.raises(ConfigError, match="buffer"):
        length_penalty("", "x", max_length=10, buffer=20)


def test_repetition_penalty():
    assert repetition_penalty("", "the cat sat on the mat today") == 0.0
    assert repetition_penalty("", "") == 0.0
    loop = "I think so. " * 50
    assert -1.0 <= repetition_penalty("", loop) < -0.9
    assert repetition_penalty("", "a b c a b c", ngram=3) == pytest.approx(-0.25)
    assert repetition_penalty("", loop, max_penalty=0.5) == pytest.approx(repetition_penalty("", loop) / 2)


# ---------------------------------------------------------------- loading

def test_load_reward_functions_by_name_options_and_file(tmp_path):
    assert list(load_reward_functions("accuracy, format")) == ["accuracy", "format"]
    user = tmp_path / "my_rewards.py"
    user.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\nclass Cfg:\n    bonus: float = 0.5\n"
        "def brevity(prompt, completion, bonus=Cfg().bonus, **row):\n"
        "    return bonus if len(completion) < 10 else 0.0\n"
    )
    fns = load_reward_functions([
        "accuracy",
        {"name": "format", "style": "boxed"},
        {"name": "length", "max_length": 100, "buffer": 20},
        f"{user}:brevity",
    ])
    assert list(fns) == ["accuracy", "format", "length", "brevity"]
    assert fns["format"]("Q", "\\boxed{4}", task="t", answer="4", solution="", meta={}) == 1.0
    assert fns["length"]("Q", "x" * 90, task="t", answer="4", solution="", meta={}) == pytest.approx(-0.5)
    assert fns["brevity"]("Q", "short") == 0.5
    assert fns["accuracy"]("Q", "<answer>4</answer>", answer="4") == 1.0


def test_load_reward_functions_errors(tmp_path):
    with pytest.raises(ConfigError, match="valid names: accuracy, format, length, repetition"):
        load_reward_functions("accuracy,correctness")
    with pytest.raises(ConfigError, match="max_length"):
        load_reward_functions(["length"])  # needs its options
    with pytest.raises(ConfigError, match="twice"):
        load_reward_functions("format,format")
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward_functions([str(tmp_path / "nope.py") + ":f"])
    bad = tmp_path / "bad.py"
    bad.write_text("def two_args(prompt, completion):\n    return 1.0\nraise_later = 1\n")
    with pytest.raises(ConfigError, match=r"\*\*kwargs"):
        load_reward_functions([f"{bad}:two_args"])
    with pytest.raises(ConfigError, match="no function"):
        load_reward_functions([f"{bad}:missing"])
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    with pytest.raises(ConfigError, match="failed to load"):
        load_reward_functions([f"{broken}:f"])
    with pytest.raises(ConfigError, match="no reward functions"):
        load_reward_functions("")


# ---------------------------------------------------------------- safe_reward

def _raises(prompt, completion, **row):
    raise RuntimeError("reward bug")


def _sleeps(prompt, completion, **row):
    time.sleep(5)
    return 1.0


def _dies(prompt, completion, **row):
    os._exit(3)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_safe_reward_contains_exceptions_and_hangs(isolation):
    raising = safe_reward(_raises, timeout_s=2, isolation=isolation)
    assert raising("p", "c") is None
    assert raising.counters.errors == 1 and "reward bug" in raising.counters.last_error

    sleeping = safe_reward(_sleeps, timeout_s=0.5, isolation=isolation)
    start = time.perf_counter()
    assert sleeping("p", "c") is None
    assert time.perf_counter() - start < 1.5
    assert sleeping.metrics()["timeouts"] == 1.0 and sleeping.metrics()["calls"] == 1.0

    odd = safe_reward(lambda p, c, **r: float("nan") if c == "nan" else ("text" if c == "str" else None),
                      timeout_s=2, isolation=isolation)
    assert odd("p", "nan") is None and odd("p", "str") is None and odd("p", "none") is None
    assert odd.counters.errors == 2 and odd.counters.unjudged == 1
    for wrapped in (raising, sleeping, odd):
        wrapped.close()


def test_safe_reward_process_pool_recovers_and_stays_cheap():
    closure = lambda p, c, **r: 1.0 if c == "ok" else _sleeps(p, c)  # noqa: E731  (not picklable)
    wrapped = safe_reward(closure, timeout_s=0.5, isolation="process", max_workers=2)
    assert wrapped("p", "ok") == 1.0
    assert wrapped("p", "hang") is None  # kills the hung worker...
    assert wrapped("p", "ok") == 1.0  # ...and a fresh one answers
    start = time.perf_counter()
    results = [wrapped("p", "ok", answer="1", meta={"numbers": [1, 2]}) for _ in range(200)]
    assert results == [1.0] * 200 and time.perf_counter() - start < 2.0  # no process per call
    assert wrapped.counters.timeouts == 1 and wrapped.counters.calls == 203

    dying = safe_reward(_dies, timeout_s=2, isolation="process")
    assert dying("p", "c") is None and dying.counters.crashes == 1
    wrapped.close()
    dying.close()


_KILLED_PARENT = """
import multiprocessing, threading, time
from seekforge.rewards import safe_reward
wrapped = safe_reward(lambda p, c: (time.sleep(float(c)), 1.0)[1], timeout_s=900, isolation="process", max_workers=2)
threading.Thread(target=wrapped, args=("p", "2")).start()  # two calls at once: two workers, the second forked
threading.Thread(target=wrapped, args=("p", "600")).start()  # holding the first's pipe end; this one stays busy
deadline = time.monotonic() + 60
while len(multiprocessing.active_children()) < 2 and time.monotonic() < deadline:  # a loaded host starts them late
    time.sleep(0.05)
time.sleep(3)  # the 2-second call has returned: its worker waits idle
print(" ".join(str(c.pid) for c in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def test_safe_reward_workers_exit_when_the_trainer_is_killed():
    """A trainer killed with SIGKILL runs no cleanup: its idle and busy reward workers must still go."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pids) == 2

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper counts as gone
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_safe_reward_is_thread_safe_and_bounds_waiting():
    wrapped = safe_reward(lambda p, c, **r: (time.sleep(0.05), float(len(c)))[1], timeout_s=30, max_workers=2)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, wrapped("p", "x" * i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: float(i) for i in range(8)}
    wrapped.close()


def test_safe_reward_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="callable"):
        safe_reward("accuracy")
    with pytest.raises(ConfigError, match="timeout_s"):
        safe_reward(_raises, timeout_s=0)
    with pytest.raises(ConfigError, match="isolation"):
        safe_reward(_raises, isolation="docker")
    with pytest.raises(ConfigError, match="max_workers"):
        safe_reward(_raises, max_workers=0)
    with pytest.raises(ConfigError, match="max_memory_mb"):
        safe_reward(_raises, max_memory_mb=0)


def _allocate(mib):
    return len(bytearray(mib * 2**20))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_safe_reward_checks_results_its_own_way_and_caps_memory(isolation):
    """`result` replaces the number check (other untrusted computations use the same barrier); `max_memory_mb`
    caps what a worker process may allocate beyond what it had when forked."""
    words = safe_reward(lambda text: text.split(), result=list, isolation=isolation)
    assert words("a b") == ["a", "b"]
    picky = safe_reward(lambda text: text, result=lambda v: int(v), isolation=isolation)
    assert picky("7") == 7 and picky("seven") is None and picky.counters.errors == 1
    if isolation == "process":
        capped = safe_reward(_allocate, timeout_s=30, max_memory_mb=128, isolation="process")
        assert capped(16) == 16 * 2**20  # within the cap
        assert capped(2048) is None and "MemoryError" in capped.counters.last_error
        assert capped(16) == 16 * 2**20  # the worker survives a refused allocation
        capped.close()
