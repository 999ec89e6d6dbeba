"""Verifiable tasks: seeded problems with gold answers and worked solutions.

    from seekforge.tasks import get_task
    rows = get_task("arithmetic", digits=3).rows("train", n=1000, seed=0)
"""

from seekforge.tasks.base import Row, Task
from seekforge.tasks.registry import BUILTIN_TASKS, get_task, list_tasks
from seekforge.tasks.templates import r1_zero_prompt

__all__ = ["BUILTIN_TASKS", "Row", "Task", "get_task", "list_tasks", "r1_zero_prompt"]
