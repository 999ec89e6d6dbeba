"""The rule chain: solvers in order, each call bounded in time and memory in a worker process."""

from __future__ import annotations

import time

import pytest

from seekforge.dual_chain import RuleChain, Solution, Solver, TableSolver, default_solvers
from seekforge.errors import ConfigError


class Spin(Solver):
    name = "spin"

    def applies(self, question):
        while True:
            pass


class Hog(Solver):
    name = "hog"

    def applies(self, question):
        block = bytearray(4 * 2**30)  # 4 GiB, past the cap
        return Solution(str(len(block)), "", self.name)


class Wrong(Solver):
    name = "wrong"

    def applies(self, question):
        return "42"  # not a Solution


@pytest.fixture(scope="module")
def rules():
    chain = RuleChain([*default_solvers(), TableSolver({"France": {"capital": "Paris"}})], timeout_s=1.0)
    yield chain
    chain.close()


def test_the_first_solver_that_applies_answers(rules):
    assert rules.solve("What is 12 + 30?").solver == "arithmetic"
    assert rules.solve("Convert 5 km to m") == Solution("5000", "5 kilometer = 5000 meter", "units")
    assert rules.solve("Solve 2x + 3 = 11").answer == "4"
    assert rules.solve("What is the capital of France?").answer == "Paris"
    assert rules.solve("Tell me a story") is None
    assert rules.solve("") is None and rules.solve("x" * 5000) is None


@pytest.mark.parametrize("question", [
    "((x + 1)^12)^12 + x^7 = 3",  # a legal degree-144 polynomial: sympy works on it far longer than allowed
    "(x + y + z)^12 = (x - y)^11 + z and x^12 + y^12 = z^5 and x*y*z = 7",
])
def test_a_solver_that_would_hang_is_cut_off(rules, question):
    timeouts = rules.counters.timeouts
    start = time.perf_counter()
    assert rules.solve(question) is None
    assert time.perf_counter() - start < 1.0 + 3.0  # the timeout, a fresh worker's start, a busy host
    assert rules.counters.timeouts == timeouts + 1
    assert rules.solve("What is 2 + 2?").answer == "4"  # the chain goes on with a new worker


def test_endless_loops_and_memory_hogs_are_stopped():
    spin = RuleChain([Spin()], timeout_s=0.3)
    start = time.perf_counter()
    assert spin.solve("anything") is None and time.perf_counter() - start < 2.0
    assert spin.counters.timeouts == 1
    spin.close()
    hog = RuleChain([Hog()], timeout_s=10.0, max_memory_mb=256)
    start = time.perf_counter()
    assert hog.solve("anything") is None and time.perf_counter() - start < 5.0  # refused, not swapped in
    assert hog.counters.errors == 1 and "MemoryError" in hog.counters.last_error
    hog.close()
    wrong = RuleChain([Wrong()])
    assert wrong.solve("anything") is None and "expected a Solution" in wrong.counters.last_error
    wrong.close()


def test_bad_chains_are_refused():
    with pytest.raises(ConfigError, match="Solver instances"):
        RuleChain([])
    with pytest.raises(ConfigError, match="Solver instances"):
        RuleChain([lambda q: None])
    with pytest.raises(ConfigError, match="max_memory_mb"):
        RuleChain(max_memory_mb=0)
