"""The two kinds of evaluation example every task produces, as plain text (the runner tokenises)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MultipleChoiceExample:
    """Score `context + continuation` for each continuation; the best score should be `gold`."""

    doc_id: str
    context: str
    continuations: list[str]  # each with its leading delimiter (usually a space)
    gold: int
    where: str = ""  # file:line, for messages


@dataclass
class GenerationExample:
    """Generate after `prompt`, extract an answer, compare it with `target` (exact match)."""

    doc_id: str
    prompt: str  # plain-text prompt (few-shot examples included)
    target: str  # the normalised reference answer
    # The same prompt as chat turns (few-shot examples as earlier user/assistant turns), for instruct models.
    messages: list[dict] = field(default_factory=list)
    where: str = ""
