"""Multiple-choice format adapters: one small function per benchmark, `Record -> (context, continuations, gold)`.

Every multiple-choice task shares one pipeline (read records -> adapter -> few-shot -> score -> accuracy);
adding a benchmark means writing one adapter here and one `register_task` line in `tasks.py`.
Prompts follow lm-evaluation-harness's conventions (which LLaDA B.6 follows) so numbers are comparable:
continuations carry a leading space and are scored after the context.
"""

from __future__ import annotations

import re

from .records import Record

Adapted = tuple[str, list[str], int]


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning of HellaSwag's WikiHow artefacts: ' [title]' becomes '. ', other
    bracketed tokens such as '[header]' or '[step]' are dropped, and the double spaces they leave collapse.
    Unlike the harness we also strip the result, so an ending that began with '[step]' does not start with a
    space (which would give two spaces after the continuation delimiter)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def hellaswag(record: Record) -> Adapted:
    # `ctx` is ctx_a + " " + ctx_b in the released files; rebuild it as the harness does when both halves exist
    # (capitalising ctx_b, which starts mid-sentence in lower case).
    if record.get("ctx_a") is not None and record.get("ctx_b") is not None:
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    else:
        ctx = record["ctx"]
    label = record.get("activity_label")
    query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
    endings = record["endings"]
    if not isinstance(endings, list) or not endings:
        raise record.error("field 'endings' must be a non-empty list of strings")
    return query, [" " + hellaswag_preprocess(e) for e in endings], parse_index(record, record["label"])


def arc(record: Record) -> Adapted:
    """AI2 ARC jsonl: `answerKey` is a letter (A-E) or, for some items, a digit (1-5); it names a choice label."""
    choices = record["question.choices"]
    if not isinstance(choices, list) or not choices:
        raise record.error("field 'question.choices' must be a non-empty list of {text, label}")
    labels = [str(c.get("label", "")).strip() for c in choices]
    texts = [c.get("text") for c in choices]
    if any(t is None for t in texts):
        raise record.error("a choice in 'question.choices' has no 'text'")
    key = str(record["answerKey"]).strip()
    if key not in labels:
        raise record.error(f"label out of range: answerKey {key!r} is not one of the choice labels {labels}")
    context = f"Question: {record['question.stem']}\nAnswer:"
    return context, [" " + t for t in texts], labels.index(key)


def piqa(record: Record) -> Adapted:
    """PIQA jsonl (`goal`, `sol1`, `sol2`); `label` is joined in by the reader from `X-labels.lst`."""
    context = f"Question: {record['goal']}\nAnswer:"
    return context, [" " + record["sol1"], " " + record["sol2"]], parse_index(record, record["label"])


MMLU_LETTERS = "ABCD"


def mmlu(record: Record) -> Adapted:
    """MMLU csv row without header: question, A, B, C, D, answer letter. The model scores the letter."""
    question, options, answer = record[0], [record[i] for i in range(1, 5)], str(record[5]).strip()
    if answer not in MMLU_LETTERS:
        raise record.error(f"label out of range: answer {answer!r} is not one of A, B, C, D")
    lines = [question.strip()] + [f"{letter}. {text.strip()}" for letter, text in zip(MMLU_LETTERS, options)]
    return "\n".join(lines) + "\nAnswer:", [" " + letter for letter in MMLU_LETTERS], MMLU_LETTERS.index(answer)


def parse_index(record: Record, value) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise record.error(f"label {value!r} is not an integer") from None


__all__ = ["arc", "hellaswag", "hellaswag_preprocess", "mmlu", "piqa"]
