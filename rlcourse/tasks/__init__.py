"""Tasks with gold rewards: ``concise`` (style, for SFT and offline preference learning) and
``arithmetic`` (verifiable, for online RL). ``get_task(name)`` returns a :class:`Task`."""

from __future__ import annotations

from dataclasses import replace

from rlcourse.tasks.arithmetic import TASK as ARITHMETIC
from rlcourse.tasks.base import SPLITS, Task
from rlcourse.tasks.concise import TASK as CONCISE

TASKS: dict[str, Task] = {task.name: task for task in (CONCISE, ARITHMETIC)}
"""Every task, by name."""


def get_task(name: str, system: str | None = None) -> Task:
    """The task called ``name``, its prompts led by the system message ``system`` when given (``Task.system``); a
    ValueError lists the choices for an unknown name."""
    try:
        task = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
    return task if system is None else replace(task, system=system)


__all__ = ["TASKS", "SPLITS", "Task", "get_task"]
