"""What every verifiable task is: seeded rows of (prompt, gold answer, worked solution).

Train and test never share a problem. Each generated problem has an identity key (the maths
of it, not its wording: countdown's sorted numbers and target, a word problem's template and
numbers); a stable hash of the key puts it in the test split iff hash % TEST_MODULUS == 0.
`rows` draws candidates from a random stream seeded by (task, knobs, split, seed) and keeps
those that belong to the split, so the split of a problem never depends on the seed or on the
difficulty knobs it was drawn under.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

from seekforge.errors import ConfigError
from seekforge.tasks.answers import answers_match

if TYPE_CHECKING:
    from seekforge.documents import Document

SPLITS = ("train", "test")
TEST_MODULUS = 8  # about one problem in eight is reserved for test


@dataclass(frozen=True)
class Row:
    task: str  # registry name
    prompt: str  # the question in plain text
    answer: str  # gold final answer, canonical string
    solution: str  # worked steps in plain text; the last line states the answer
    meta: dict  # what a reward may need beyond the answer (countdown's numbers and target)


def in_test_split(task: str, key: str) -> bool:
    digest = hashlib.blake2b(f"{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TEST_MODULUS == 0


def final_line(answer: str) -> str:
    """The last line of every built-in solution, so SFT targets end the same way."""
    return f"So the answer is {answer}."


class Task:
    """A generator of verifiable problems. Subclasses are dataclasses whose fields are the
    difficulty knobs, and implement `problem(rng) -> (key, Row)`."""

    name: ClassVar[str]

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        raise NotImplementedError

    def rows(self, split: str, n: int, seed: int) -> list[Row]:
        """`n` rows of `split`, the same for the same (knobs, split, seed)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n must be a non-negative integer, got {n!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        rng = random.Random(f"seekforge|{self.name}|{self.knobs()}|{split}|{seed}")
        want_test = split == "test"
        out: list[Row] = []
        budget = 1000 + 100 * TEST_MODULUS * n
        while len(out) < n:
            if budget == 0:
                raise ConfigError(
                    f"task {self.name!r} with {self.knobs()} has too few distinct problems to draw "
                    f"{n} {split} rows; raise its difficulty knobs or ask for fewer rows"
                )
            budget -= 1
            key, row = self.problem(rng)
            if in_test_split(self.name, key) == want_test:
                out.append(row)
        return out

    def careless(self, row: Row, rng: random.Random) -> Row | None:
        """The row as a careless writer would solve it: one slip in the worked steps, carried on to a wrong
        answer (the built-in corpus mixes such documents in, as web text does). None: the task has no
        such variant."""
        return None

    def corpus_text(self, row: Row) -> Document | None:
        """The row as a pretraining document (text, or Prompted: trained on its completion only) where it is not
        the R1-Zero rendering of the built-in corpus (seekforge.data.corpus.render_example); None: that
        rendering."""
        return None

    def score(self, predicted: str | None, answer: str | None, meta: dict) -> float | None:
        """Reward for an extracted answer, None without the gold needed to judge; tasks with their
        own notion of correct override it."""
        if answer is None or not str(answer).strip():
            return None
        return 1.0 if answers_match(predicted, str(answer)) else 0.0

    def knobs(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


def check_int(task: str, knob: str, value: object, low: int, high: int) -> None:
    """Raise ConfigError unless `value` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{task}: {knob} must be an integer from {low} to {high}, got {value!r}")
