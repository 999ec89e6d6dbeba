"""Errors raised at seekforge's edges. Every message names the problem and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class SeekforgeError(Exception):
    """Base class: a mistake in the user's input, files or request, not in seekforge."""


class ConfigError(SeekforgeError, ValueError):
    """An invalid or inconsistent configuration (model, training, sampling)."""


class CheckpointError(SeekforgeError):
    """A checkpoint directory or file that cannot be read as asked."""


class DataError(SeekforgeError, ValueError):
    """A data file (corpus, shard, prepared directory) that cannot be read as asked."""
