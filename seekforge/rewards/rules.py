"""The rule-based rewards of R1: is the final answer right, and is the output well formed.

Every reward has the signature reward(prompt, completion, **row_fields) -> float | None, where
row_fields are a Row's task, answer, solution and meta (plus options bound at load time);
None means the reward cannot judge this row, which is not the same as "wrong".
"""

from __future__ import annotations

import functools
import re

from seekforge.errors import ConfigError, SeekforgeError
from seekforge.tasks import Task, get_task
from seekforge.tasks.answers import answers_match, extract_answer, last_boxed

_TAGS = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
FORMAT_STYLES = ("tags", "boxed")


@functools.lru_cache(maxsize=None)
def _task_scorer(task: str | None) -> Task | None:
    """The registered task of that name (for its own scoring rule), or None for other names."""
    if not task:
        return None
    try:
        return get_task(task)
    except SeekforgeError:
        return None


def accuracy_reward(prompt: str, completion: str, *, answer: str | None = None, task: str | None = None,
                    meta: dict | None = None, **_) -> float | None:
    """1.0 when the completion's final answer is right, else 0.0; None without a gold answer.

    The final answer is the last <answer> block, else the last \\boxed{} (several answers: the
    last one counts). A registered task scores with its own rule (countdown: the expression is
    evaluated and checked against the numbers and target); other rows compare with the gold
    answer as in seekforge.tasks.answers (exact for numbers, math-verify for LaTeX, exact text
    otherwise)."""
    predicted = extract_answer(completion)
    scorer = _task_scorer(task)
    if scorer is not None:
        return scorer.score(predicted, answer, meta or {})
    if answer is None or not str(answer).strip():
        return None
    return 1.0 if answers_match(predicted, str(answer)) else 0.0


def format_reward(prompt: str, completion: str, *, style: str = "tags", think_opened: bool | None = None,
                  **_) -> float:
    """1.0 for a well-formed completion, else 0.0.

    style="tags": exactly "<think> ... </think> <answer> ... </answer>" with a non-empty answer
    and nothing after it. When the prompt already opened the think block (think_opened; by
    default: the prompt ends with "<think>", as r1_zero_prompt's does) the completion may start
    inside it, without its own <think>.
    style="boxed": the completion contains a non-empty \\boxed{...}."""
    if not isinstance(completion, str):
        return 0.0
    if style == "boxed":
        return 1.0 if last_boxed(completion) else 0.0
    if style != "tags":
        raise ConfigError(f"format_reward: unknown style {style!r}; use one of {', '.join(FORMAT_STYLES)}")
    if think_opened is None:
        think_opened = isinstance(prompt, str) and prompt.rstrip().endswith("<think>")
    text = completion
    if think_opened and not completion.lstrip().startswith("<think>"):
        text = "<think>" + completion
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    match = _TAGS.fullmatch(text)
    return 1.0 if match and match.group(2).strip() else 0.0
