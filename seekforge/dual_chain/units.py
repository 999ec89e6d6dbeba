"""Unit conversion ("Convert 5 km to miles", "How many feet are in 3 meters?", "100 degC in degF"), by pint.

Unit names are screened first (letters, spaces, / ^ * and small digits, at most MAX_UNIT_CHARS) and read by
pint's own unit parser, which evaluates no Python. Offset units (temperatures) convert as quantities.
"""

from __future__ import annotations

import functools
import re

from seekforge.dual_chain.solver import MAX_QUESTION_CHARS, Solution, Solver

MAX_UNIT_CHARS = 40
_NUM = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d{1,3})?)"
_UNIT = r"((?:°\s?)?[A-Za-z][A-Za-z °/^*\d]{0,60}?)"
_PATTERNS = [
    # how many <target> (are|is) (there )?in <value> <source>
    (re.compile(rf"how many\s+{_UNIT}\s+(?:are|is)\s+(?:there\s+)?in\s+(?:a\s+)?{_NUM}\s*{_UNIT}\s*\??\s*$", re.I),
     ("target", "value", "source")),
    # (convert|express)? <value> <source> (to|in|into|as) <target>
    (re.compile(rf"(?:^|\b(?:convert|express|what is|how much is)\s+){_NUM}\s*{_UNIT}\s+(?:to|into|in|as)\s+"
                rf"{_UNIT}\s*[?.]?\s*$", re.I), ("value", "source", "target")),
]
_ALIASES = {"celsius": "degC", "degrees celsius": "degC", "degree celsius": "degC", "°c": "degC", "° c": "degC",
            "fahrenheit": "degF", "degrees fahrenheit": "degF", "degree fahrenheit": "degF", "°f": "degF",
            "° f": "degF", "kelvin": "kelvin", "degrees kelvin": "kelvin"}


@functools.cache
def _registry():
    import pint

    return pint.UnitRegistry()


def _units(text: str):
    """pint's unit for a screened name, None for anything else."""
    text = " ".join(text.strip().split())
    text = _ALIASES.get(text.lower(), text)
    if not text or len(text) > MAX_UNIT_CHARS or re.search(r"\d{3}", text):
        return None
    try:
        return _registry().parse_units(text)
    except Exception:  # pint raises its own errors (UndefinedUnitError, DefinitionSyntaxError, ...) and more
        return None


class UnitSolver(Solver):
    name = "units"

    def prepare(self) -> None:
        _registry()  # about a second to build: once, before the workers fork

    def applies(self, question: str) -> Solution | None:
        if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
            return None
        for pattern, names in _PATTERNS:
            m = pattern.search(question.strip())
            if m is None:
                continue
            parts = dict(zip(names, m.groups()))
            source, target = _units(parts["source"]), _units(parts["target"])
            if source is None or target is None:
                continue
            try:
                value = float(parts["value"])
                result = _registry().Quantity(value, source).to(target)
            except Exception:  # incompatible dimensions, overflow: not a conversion pint makes
                continue
            magnitude = float(result.magnitude)
            if magnitude != magnitude or abs(magnitude) == float("inf"):
                continue
            answer = f"{magnitude:.10g}"
            return Solution(answer, f"{parts['value']} {source} = {answer} {target}", self.name)
        return None
