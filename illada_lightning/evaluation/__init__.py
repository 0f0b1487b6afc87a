"""Evaluation: benchmark tasks read from their public file formats, generated tasks, the runner, the CLI and
the per-epoch callback.

    from illada_lightning.evaluation import EvalConfig, evaluate
    results = evaluate(model, tokenizer, ["cloze", "gsm8k"], EvalConfig(limit=100))
"""

from .config import EvalConfig
from .runner import evaluate
from .tasks import Task, get_task, register_task, registered_tasks

__all__ = ["EvalConfig", "Task", "evaluate", "get_task", "register_task", "registered_tasks"]
