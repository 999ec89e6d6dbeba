"""reasoning-gym datasets as tasks named "rg:<dataset>", scored by the dataset's own checker.

Constructor kwargs go to the dataset's config (`get_task("rg:basic_arithmetic", min_terms=2)`).
reasoning-gym has no worked solutions, so `solution` is only the final line. The split rule is
ours (a hash of the question text), so train and test never share a question even though
reasoning-gym's own seeds could collide. `meta["rg_entry"]` keeps the dataset entry, which
some checkers need (its metadata may hold tuples: not JSON-safe as is).
"""

from __future__ import annotations

import hashlib
from typing import Any

from seekforge.errors import ConfigError
from seekforge.tasks.base import SPLITS, TEST_MODULUS, Row, Task, final_line, in_test_split

PREFIX = "rg:"


def gym_dataset_names() -> list[str]:
    """Names of reasoning-gym's datasets; empty when reasoning-gym is not installed."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return []
    return sorted(DATASETS)


class GymTask(Task):
    def __init__(self, dataset: str, **config: Any):
        names = gym_dataset_names()
        if not names:
            raise ConfigError("reasoning-gym tasks need the reasoning-gym package: pip install 'seekforge[rl]'")
        if dataset not in names:
            raise ConfigError(f"no reasoning-gym dataset {dataset!r}; valid names: {', '.join(names)}")
        self.dataset = dataset
        self.name = PREFIX + dataset
        self.config = config
        # Opening one now makes a bad config fail here rather than at the first rows() call.
        self._score_answer = self._open(seed=0, size=1).score_answer

    def knobs(self) -> dict:
        return dict(self.config)

    def _open(self, seed: int, size: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.dataset, seed=seed, size=size, **self.config)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"{self.name}: invalid config {self.config}: {e}") from e

    def rows(self, split: str, n: int, seed: int) -> list[Row]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not isinstance(n, int) or n < 0 or not isinstance(seed, int):
            raise ConfigError(f"n must be a non-negative integer and seed an integer, got n={n!r}, seed={seed!r}")
        stream = hashlib.blake2b(f"{self.name}|{sorted(self.config.items())}|{split}|{seed}".encode(), digest_size=4)
        size = 1000 + 100 * TEST_MODULUS * n
        data = self._open(seed=int.from_bytes(stream.digest(), "big"), size=size)
        out: list[Row] = []
        for index in range(size):
            if len(out) == n:
                return out
            entry = data[index]
            if in_test_split(self.name, entry["question"]) == (split == "test"):
                answer = str(entry["answer"])
                out.append(Row(self.name, entry["question"], answer, final_line(answer), {"rg_entry": entry}))
        if len(out) < n:
            raise ConfigError(f"{self.name} yielded only {len(out)} of {n} {split} rows; ask for fewer")
        return out

    def score(self, predicted: str | None, answer: str | None, meta: dict) -> float | None:
        entry = meta.get("rg_entry") or ({"question": "", "answer": answer, "metadata": {}} if answer else None)
        if entry is None:
            return None
        if predicted is None:
            return 0.0
        return float(self._score_answer(predicted, entry))
