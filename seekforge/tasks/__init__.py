"""Verifiable tasks: seeded problems with gold answers and worked solutions.

    from seekforge.tasks import get_task
    rows = get_task("arithmetic", digits=3).rows("train", n=1000, seed=0)

base.py (Row, Task), registry.py (the built-in tasks by name), one module per task (arithmetic, chain_sum,
countdown, word_problems; gym.py wraps reasoning-gym), answers.py (answer extraction and comparison),
safe_eval.py (bounded arithmetic evaluation), templates.py (the R1-Zero prompt and chat template).

May import seekforge.errors, configio and documents (a task's corpus form may be a Prompted document) only:
the data, rewards and RL layers build on it.
"""

from seekforge.tasks.base import Row, Task
from seekforge.tasks.registry import BUILTIN_TASKS, get_task, list_tasks
from seekforge.tasks.templates import r1_zero_prompt

__all__ = ["BUILTIN_TASKS", "Row", "Task", "get_task", "list_tasks", "r1_zero_prompt"]
