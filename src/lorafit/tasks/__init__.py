"""Tasks as plug-ins: each file registers one `Task` (see base.py); `get_task(name)` picks it."""

from lorafit.tasks import (  # noqa: F401  (registers the tasks)
    causal_lm,
    classification,
    image_classification,
    recommendation,
)
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
