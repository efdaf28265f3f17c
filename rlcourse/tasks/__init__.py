"""Tasks with gold rewards: ``concise`` (style, for SFT and offline preference learning) and
``arithmetic`` (verifiable, for online RL). ``get_task(name)`` returns a :class:`Task`."""

from __future__ import annotations

from rlcourse.tasks.arithmetic import TASK as ARITHMETIC
from rlcourse.tasks.base import SPLITS, Task
from rlcourse.tasks.concise import TASK as CONCISE

TASKS: dict[str, Task] = {task.name: task for task in (CONCISE, ARITHMETIC)}
"""Every task, by name."""


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the choices for an unknown name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


__all__ = ["TASKS", "SPLITS", "Task", "get_task"]
