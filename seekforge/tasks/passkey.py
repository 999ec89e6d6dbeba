"""Passkey retrieval: a number hidden in filler text, asked for at the end (the long-context probe of
Mohtashami and Jaggi, used by YaRN and DeepSeek to show that an extended context is really read).

The filler is short sentences drawn at random from a fixed list, so the key is the only thing in the text
that cannot be predicted without looking back at it. `depth` places the key (0: at the start of the
filler, 1: at its end); the number of filler sentences sets the length. The reward is the rule reward of
every task: the extracted answer must equal the key.

As a pretraining or extension document (`corpus_text`), a row is plain text ending with the answer, the
form a base model is probed in: "... What is the pass key? The pass key is 48213." With `loss="answer"` the
document is Prompted (seekforge.documents): only the key and its full stop are targets. The filler is random and
the key's first statement cannot be predicted, so training on them is noise; a tiny model learns retrieval
from the answer alone about twice as fast (docs/LONG_CONTEXT.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from seekforge.documents import Document, Prompted
from seekforge.errors import ConfigError
from seekforge.tasks.base import Row, Task, check_int, final_line

FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "Birds sing in the morning.", "The road goes on.", "Snow falls in winter.",
    "The wind is cold.", "Stars shine at night.", "The hills are far away.",
)
QUESTION = "What is the pass key?"
ANSWER_LEAD = "The pass key is "  # what the answer follows, in the question's reply and in corpus_text


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it."


@dataclass
class PasskeyTask(Task):
    """min_filler..max_filler filler sentences with a `digits`-digit key at `depth` (-1: anywhere); `loss`: which
    tokens of its corpus document are targets ("all" or "answer")."""

    name = "passkey"
    min_filler: int = 0
    max_filler: int = 8
    depth: float = -1.0
    digits: int = 5
    loss: str = "all"

    def __post_init__(self) -> None:
        check_int(self.name, "min_filler", self.min_filler, 0, 10**7)
        check_int(self.name, "max_filler", self.max_filler, self.min_filler, 10**7)
        check_int(self.name, "digits", self.digits, 1, 32)
        if not isinstance(self.depth, (int, float)) or isinstance(self.depth, bool) or \
                not (self.depth == -1 or 0.0 <= self.depth <= 1.0):
            raise ConfigError(f"passkey: depth must be in [0, 1] (where the key sits) or -1 (anywhere), "
                              f"got {self.depth!r}")
        if self.loss not in ("all", "answer"):
            raise ConfigError(f"passkey: loss must be 'all' (every token a target) or 'answer' (the key only), "
                              f"got {self.loss!r}")

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        n = rng.randint(self.min_filler, self.max_filler)
        before = rng.randint(0, n) if self.depth == -1 else round(self.depth * n)
        key = str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1))
        filler = [rng.choice(FILLER) for _ in range(n)]
        text = " ".join([*filler[:before], key_sentence(key), *filler[before:], QUESTION])
        row = Row(task=self.name, prompt=text, answer=key, solution=f"{ANSWER_LEAD}{key}.\n{final_line(key)}",
                  meta={"filler": n, "before": before, "depth": before / n if n else 0.0})
        return f"{key}|{n}|{before}", row

    def knobs(self) -> dict:  # the rows' seed: `loss` makes the same rows into other documents
        return {k: v for k, v in super().knobs().items() if k != "loss"}

    def corpus_text(self, row: Row) -> Document:
        document = Prompted(probe_prefix(row), f"{row.answer}.")
        return document if self.loss == "answer" else document.prompt + document.completion


def probe_prefix(row: Row) -> str:
    """The row's text up to its answer: a model that has read the key continues it with the key."""
    return f"{row.prompt} {ANSWER_LEAD}"
