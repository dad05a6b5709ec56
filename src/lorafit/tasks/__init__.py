"""Tasks as plug-ins: each file registers one `Task` (see base.py); `get_task(name)` picks it."""

from lorafit.tasks import causal_lm, classification  # noqa: F401  (registers the tasks)
from lorafit.tasks.base import (
    DEFAULT_TASK,
    Task,
    get_task,
    register_task,
    task_names,
    task_of_folder,
)

__all__ = [
    "DEFAULT_TASK",
    "Task",
    "get_task",
    "register_task",
    "task_names",
    "task_of_folder",
]
