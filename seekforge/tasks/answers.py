"""Finding the final answer in a completion and comparing it with a gold answer.

Extraction: the content of the *last* complete <answer>...</answer> block; without one, the
content of the last \\boxed{...}. A model that writes several answers is judged on its final
word, as a reader would (and as R1's rule reward does); earlier answers neither help nor hurt.

Comparison, by the kind of gold answer:
- a plain number ("1134", "-4", "2.5", "3/4"): the prediction must itself be a plain number
  (LaTeX \\frac{a}{b}, thousands commas, a $ sign and trailing unit words are tolerated), and
  the two are compared exactly as fractions. An *expression* equal to the gold ("345 + 789")
  scores 0: otherwise restating the question would earn the reward.
- other mathematics (LaTeX, symbols): math-verify, after screening out inputs that would make
  sympy compute huge powers or chew on very long text.
- anything else (words, lists): exact match after trimming whitespace and a final period.
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# ASCII digits only: "１１３４" is not how an answer is written (and \d alone would accept it).
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?", re.ASCII)
_LATEX_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}", re.ASCII)
_UNIT_WORDS = re.compile(r"[A-Za-z][A-Za-z ]*")
# What would make sympy compute something huge: a power of a power (also "(a^b)^{999}"), an
# exponent of 4+ digits, Python-style **, a factorial or binomial of a 4+ digit number.
_RISKY = re.compile(
    r"\^\s*\{[^}]*\^|\^\s*\d+\s*\^|\)\s*\^\s*\{?\s*-?\d{3,}|\^\s*\{?\s*-?\d{4,}|\*\*|\d{4,}\s*!|binom\s*\{\s*\d{4,}",
    re.ASCII,
)
_MAX_MATH_VERIFY_CHARS = 300
_MAX_ANSWER_CHARS = 1000  # a final answer longer than this is not an answer


def extract_answer(completion: str) -> str | None:
    """The final answer in `completion` (see the module doc), stripped; None when there is none."""
    if not isinstance(completion, str) or not completion:
        return None
    # rfind, not a regex: a looping model's "<answer>" * 10_000 must not cost quadratic time.
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        inner = completion[start + len("<answer>") : end].strip()
        boxed = last_boxed(inner)
        # "<answer>\boxed{5}</answer>" means 5; a box inside other text stays as written.
        if boxed is not None and _strip_boxed_wrapper(inner) == boxed:
            return boxed
        return inner
    return last_boxed(completion)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} with balanced braces, stripped, or None."""
    openings = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not openings:
        return None
    # One pass pairs every brace (linear even for "\\boxed{" * 10_000 with no closing brace).
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            closing[stack.pop()] = i
    for start in reversed(openings):
        if start in closing:
            return text[start + 1 : closing[start]].strip()
    return None


def _strip_boxed_wrapper(text: str) -> str | None:
    match = re.fullmatch(r"\$*\s*\\(?:boxed|fbox)\s*\{(.*)\}\s*\$*\.?", text, re.DOTALL)
    return match.group(1).strip() if match else None


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number when it is a plain number (see the module doc), else None."""
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\[,!; ]|\\text\{\s*\}", "", text).rstrip(".").strip()
    frac = _LATEX_FRAC.fullmatch(text)
    if frac:
        sign, num, den = frac.groups()
        if int(den) == 0:
            return None
        return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1)
    if text.startswith(("$", "-$")):  # currency: "$15", "-$3"
        text = text.replace("$", "", 1)
    match = _NUMBER.match(text)
    if not match:
        return None
    rest = text[match.end() :].strip()
    if rest and not _UNIT_WORDS.fullmatch(rest):
        return None
    raw = match.group(0).replace(",", "").replace(" ", "")
    if len(raw) > 200:
        return None
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def is_plain_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def _looks_mathematical(gold: str) -> bool:
    """Digits or LaTeX, and no English word once LaTeX commands are removed ("x^2+1" yes, "Paris" no)."""
    bare = re.sub(r"\\[A-Za-z]+", "", gold)
    return bool(re.search(r"[\d\\^]", gold)) and not re.search(r"[A-Za-z]{2,}", bare)


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer (rules in the module doc)."""
    if predicted is None or gold is None:
        return False
    predicted, gold = predicted.strip(), str(gold).strip()
    if len(predicted) > _MAX_ANSWER_CHARS:
        return False
    if is_plain_number(gold):
        if re.search(r"\d\s*/\s*\d", predicted) and not _is_reduced_fraction(predicted):
            return False  # "345/5" is a division left undone, not an answer
        value = parse_number(predicted)
        return value is not None and value == parse_number(gold)
    if _looks_mathematical(gold):
        return _math_verify_equal(predicted, gold)
    return _normalise_text(predicted) == _normalise_text(gold)


def _is_reduced_fraction(text: str) -> bool:
    match = re.search(r"(\d+)\s*/\s*(\d+)", text)
    return match is not None and math.gcd(int(match[1]), int(match[2])) == 1 and int(match[2]) > 1


def _normalise_text(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def _as_latex(text: str) -> str:
    """math-verify finds LaTeX inside delimiters; a bare answer gets them."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def _math_verify_equal(predicted: str, gold: str) -> bool:
    if len(predicted) > _MAX_MATH_VERIFY_CHARS or _RISKY.search(predicted):
        return False
    from math_verify import parse, verify

    # math-verify's own timeout uses SIGALRM, which exists only on the main thread; elsewhere
    # the caller's guard (seekforge.rewards.safe_reward) bounds the time instead.
    seconds = 2 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_as_latex(gold), parsing_timeout=seconds)
    pred_parsed = parse(_as_latex(predicted), parsing_timeout=seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))
