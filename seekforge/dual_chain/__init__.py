"""Dual-chain inference: an exact rule chain beside the generative chain, with a confidence switch.

    from seekforge.dual_chain import DualChain, RuleChain, TableSolver, default_solvers
    rules = RuleChain([*default_solvers(), TableSolver.from_file("capitals.csv")])
    llm.generate(prompts, params, dual_chain=DualChain(rules, threshold=0.5))

solver.py (the Solver interface: `applies(question) -> Solution | None`, answer + derivation), one module a
solver (arithmetic: the tasks' bounded evaluator; algebra: sympy behind a restricted parser; units: pint;
table: lookups in a user's CSV/JSON), chain.py (RuleChain: the solvers in order, each call bounded in time
and memory in a worker process), calc.py (the in-chain calculator, an engine inserter), switch.py (the
answer-level switch: confidence from the answer span's logprobs and agreement across samples), dual.py
(DualChain: the mode LLM.generate, `seekforge generate/chat --dual-chain` and `seekforge serve --dual-chain`
run).

May import seekforge.errors, configio, tasks (the evaluator, answer extraction and comparison) and rewards (the
bounded worker pool); the engine and the server take a DualChain as an argument and import nothing from here.
"""

from seekforge.dual_chain.algebra import AlgebraSolver
from seekforge.dual_chain.arithmetic import ArithmeticSolver
from seekforge.dual_chain.calc import Calculator
from seekforge.dual_chain.chain import RuleChain, default_solvers
from seekforge.dual_chain.dual import DualChain, question_of
from seekforge.dual_chain.solver import Solution, Solver
from seekforge.dual_chain.switch import GENERATIVE, RULE, Decision, decide
from seekforge.dual_chain.table import TableSolver, load_table
from seekforge.dual_chain.units import UnitSolver

__all__ = [
    "GENERATIVE", "RULE", "AlgebraSolver", "ArithmeticSolver", "Calculator", "Decision", "DualChain", "RuleChain",
    "Solution", "Solver", "TableSolver", "UnitSolver", "decide", "default_solvers", "load_table", "question_of",
]
