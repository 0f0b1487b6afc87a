"""The synthetic arithmetic / word-problem instruction task: exact match on the final number.

Its items come from the data pipeline's seeded generator (`illada_lightning.data.synthetic`), which writes
disjoint train / valid / test splits (`python -m illada_lightning.data.synthetic --out DIR --seed S`): the
train split is the SFT set, the test split is this task. The default is the test split shipped in the
repository (`data/instruct/test.jsonl`), so a model fine-tuned on the shipped train split shows a learning
curve within a GPU-hour. Records are `prompt`/`response` (single turn) or chat `messages` (the last
assistant turn is the reference); prompts go through the chat template by default, as in SFT.

`synthetic_choice` is the same split as a multiple-choice task: the correct result among
`SYNTHETIC_CHOICES - 1` near misses (`data.synthetic.multiple_choice`), scored with either rule of iLLaDA Eq. 2 /
LLaDA Eq. 6 after the chat-formatted question, so the scoring-rule ablation has a task a small model can do.
"""

from __future__ import annotations

from pathlib import Path

from illada_lightning.data.synthetic import multiple_choice

from .answers import extract_answer
from .examples import GenerationExample, MultipleChoiceExample, TaskSettings
from .records import Record, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO_ROOT / "data" / "instruct" / "test.jsonl"
SYNTHETIC_CHOICES = 4  # the correct result and three distractors: chance is 25 %


def synthetic_example(record: Record, doc_id: str) -> GenerationExample:
    if record.get("messages") is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise record.error("field 'messages' must be a list of turns ending with the assistant's answer")
        history, reference = messages[:-1], messages[-1].get("content", "")
    else:
        history, reference = [{"role": "user", "content": record["prompt"]}], record["response"]
    target = extract_answer(str(record.get("answer", reference)))
    if target == "":
        raise record.error(f"the reference answer {reference!r} holds no number")
    # Plain-text form (chat_template=false): the turns one per line, ending where the answer goes.
    prompt = "\n".join(m["content"] for m in history) + "\nAnswer:"
    return GenerationExample(doc_id, prompt, target, [dict(m) for m in history], record.where)


def load_synthetic(cfg: TaskSettings, path: Path) -> list[GenerationExample]:
    return [synthetic_example(record, str(i)) for i, record in enumerate(read_jsonl(path))]


def synthetic_choice_example(record: Record, doc_id: str, seed: int) -> MultipleChoiceExample:
    """The question (chat turns, or plain text ending in "Answer: "), the result among its distractors."""
    ex = synthetic_example(record, doc_id)
    choices, gold = multiple_choice(ex.target, SYNTHETIC_CHOICES, f"{seed}:{doc_id}")
    return MultipleChoiceExample(doc_id, ex.prompt + " ", choices, gold, record.where, messages=ex.messages)


def load_synthetic_choice(cfg: TaskSettings, path: Path) -> list[MultipleChoiceExample]:
    return [synthetic_choice_example(record, str(i), cfg.seed) for i, record in enumerate(read_jsonl(path))]
