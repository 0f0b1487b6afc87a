"""The task interface: what a task reads of the evaluation settings (`TaskSettings`) and the two kinds of
example it produces, as plain text (the runner tokenises).

Tasks read their settings through this protocol, never through `EvalConfig` itself: the config asks the task
registry (`tasks.py`) which names exist, so a task importing the config would close a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class TaskSettings(Protocol):
    """The evaluation settings every task may read (`EvalConfig` has them all)."""

    seed: int  # seeds few-shot draws and generated items
    data: dict[str, str]  # task name -> data file, replacing the task's default path
    chat_template: bool | None  # None: the task's own default

    def fewshot_for(self, task: str, task_default: int) -> int:
        """Few-shot examples for `task` (its own default unless the settings say otherwise)."""
        ...


@dataclass
class MultipleChoiceExample:
    """Score `context + continuation` for each continuation; the best score should be `gold`."""

    doc_id: str
    context: str
    continuations: list[str]  # each with its leading delimiter (usually a space)
    gold: int
    where: str = ""  # file:line, for messages
    # The context as chat turns, for tasks scored through the chat template (the continuation is the reply).
    messages: list[dict] = field(default_factory=list)


@dataclass
class GenerationExample:
    """Generate after `prompt`, extract an answer, compare it with `target` (exact match)."""

    doc_id: str
    prompt: str  # plain-text prompt (few-shot examples included)
    target: str  # the normalised reference answer
    # The same prompt as chat turns (few-shot examples as earlier user/assistant turns), for instruct models.
    messages: list[dict] = field(default_factory=list)
    where: str = ""
