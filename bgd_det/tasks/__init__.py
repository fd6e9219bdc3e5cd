"""Tasks: the model-family-specific parts of the pipeline (data, forward, distillation loss, evaluation)."""
from . import classification, detection  # noqa: F401
from .base import TASK_REGISTRY, Task, build_task  # noqa: F401
