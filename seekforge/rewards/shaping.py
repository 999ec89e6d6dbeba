"""Penalties that shape the length and repetitiveness of completions (never positive)."""

from __future__ import annotations

from seekforge.errors import ConfigError


def length_penalty(prompt: str, completion: str, *, max_length: int, buffer: int,
                   completion_length: int | None = None, **_) -> float:
    """DAPO's overlong shaping: 0 up to max_length - buffer, then falling linearly to -1 at
    max_length, and -1 beyond. The length is `completion_length` when the trainer passes it
    (tokens), else the completion's length in characters."""
    if not isinstance(max_length, int) or not isinstance(buffer, int) or not 0 < buffer <= max_length:
        raise ConfigError(f"length_penalty needs integers 0 < buffer <= max_length, got {buffer=}, {max_length=}")
    length = len(completion) if completion_length is None else completion_length
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / buffer
    return -1.0


def repetition_penalty(prompt: str, completion: str, *, ngram: int = 3, max_penalty: float = 1.0, **_) -> float:
    """-max_penalty times the share of repeated word n-grams: 0 for text that never repeats
    itself, near -max_penalty for a loop."""
    if not isinstance(ngram, int) or ngram < 1:
        raise ConfigError(f"repetition_penalty: ngram must be a positive integer, got {ngram!r}")
    words = completion.split()
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    if not grams:
        return 0.0
    return -max_penalty * (1.0 - len(set(grams)) / len(grams))
