"""Evaluation: benchmark tasks read from their public file formats, generated tasks, the runner, the CLI and
the per-epoch callback.

    from illada_lightning.evaluation import EvalConfig, evaluate
    results = evaluate(model, tokenizer, ["cloze", "gsm8k"], EvalConfig(limit=100))
"""

from .config import EvalConfig
from .tasks import Task, get_task, register_task, registered_tasks


def __getattr__(name: str):  # the runner imports torch: load it on first use (configs parse without torch)
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module 'illada_lightning.evaluation' has no attribute {name!r}")


__all__ = ["EvalConfig", "Task", "evaluate", "get_task", "register_task", "registered_tasks"]
