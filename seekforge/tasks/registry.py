"""Task names -> task classes: our four seeded built-in maths tasks, probes (passkey retrieval) and
reasoning-gym's datasets."""

from __future__ import annotations

import difflib
from typing import Any

from seekforge.errors import ConfigError
from seekforge.tasks.arithmetic import ArithmeticTask
from seekforge.tasks.base import Task
from seekforge.tasks.chain_sum import ChainSumTask
from seekforge.tasks.countdown import CountdownTask
from seekforge.tasks.gym import PREFIX, GymTask, gym_dataset_names
from seekforge.tasks.passkey import PasskeyTask
from seekforge.tasks.word_problems import WordProblemTask

BUILTIN_TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (ArithmeticTask, ChainSumTask, CountdownTask, WordProblemTask)
}
# Tasks that probe a skill rather than teach maths: named like the built-ins, but not in the default corpus.
PROBE_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (PasskeyTask,)}


def list_tasks() -> list[str]:
    """Built-in task names, the probes, then "rg:<dataset>" for every reasoning-gym dataset installed."""
    return [*BUILTIN_TASKS, *PROBE_TASKS, *(PREFIX + n for n in gym_dataset_names())]


def get_task(name: str, **knobs: Any) -> Task:
    """A task with its difficulty knobs set, e.g. get_task("arithmetic", digits=4)."""
    if isinstance(name, str) and name.startswith(PREFIX):
        return GymTask(name[len(PREFIX) :], **knobs)
    cls = BUILTIN_TASKS.get(name) or PROBE_TASKS.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list_tasks(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown task {name!r}.{hint} Valid names: {', '.join([*BUILTIN_TASKS, *PROBE_TASKS])}, "
            f"or rg:<dataset> for a reasoning-gym dataset (e.g. rg:basic_arithmetic; list_tasks() names them all)."
        )
    try:
        return cls(**knobs)
    except TypeError as e:
        valid = ", ".join(f.name for f in cls.__dataclass_fields__.values())
        raise ConfigError(f"task {name!r} got an unknown knob ({e}); its knobs are: {valid}") from e
