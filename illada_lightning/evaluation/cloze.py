"""A cloze multiple-choice task built from any held-out corpus, so that small models show signal.

Each item: a span of `cloze_context_words` words from one document is the context; the `cloze_continuation_words`
words that follow it are the true continuation; `cloze_choices - 1` distractors are spans of the same length
from *other* documents. A model that has learnt anything about the language (topic, syntax, local n-grams)
beats chance (1 / cloze_choices). Items are a pure function of the text and `eval.seed`.

Documents are cut with the pretraining corpus reader's rules (`data.corpus.split_text_documents`: WikiText
articles, or blank-line-separated paragraphs), so the held-out split is read as training read its own.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol

from .examples import MultipleChoiceExample, TaskSettings
from .records import EvalDataError

_HEADING = re.compile(r"^\s*=.*=\s*$")  # WikiText headings are not running text


def document_words(text: str) -> list[list[str]]:
    from illada_lightning.data.corpus import split_text_documents  # lazy: it imports `datasets`

    docs = split_text_documents(text, "auto")
    return [" ".join(line for line in d.splitlines() if not _HEADING.match(line)).split() for d in docs]


def make_cloze_examples(text: str, *, n_items: int, n_choices: int, context_words: int,
                        continuation_words: int, seed: int, where: str = "") -> list[MultipleChoiceExample]:
    docs = document_words(text)
    span = context_words + continuation_words
    usable = [i for i, words in enumerate(docs) if len(words) >= span]
    if len(docs) < 2 or not usable:
        raise EvalDataError(
            f"{where or 'cloze corpus'}: need at least 2 documents and one with >= {span} words "
            f"(cloze_context_words + cloze_continuation_words); found {len(docs)} documents, {len(usable)} long enough"
        )
    donors = [i for i, words in enumerate(docs) if len(words) >= continuation_words]
    rng = random.Random(seed)
    out = []
    for n in range(n_items):
        doc = rng.choice(usable)
        words = docs[doc]
        start = rng.randrange(len(words) - span + 1)
        context = " ".join(words[start:start + context_words])
        truth = " ".join(words[start + context_words:start + span])
        others = [i for i in donors if i != doc]
        if not others:
            raise EvalDataError(f"{where}: no other document has >= {continuation_words} words for distractors")
        choices = [truth]
        for _ in range(50 * n_choices):  # bounded: a degenerate corpus cannot loop forever
            if len(choices) == n_choices:
                break
            other = docs[rng.choice(others)]
            s = rng.randrange(len(other) - continuation_words + 1)
            candidate = " ".join(other[s:s + continuation_words])
            if candidate not in choices:
                choices.append(candidate)
        if len(choices) < n_choices:
            raise EvalDataError(f"{where}: cannot find {n_choices - 1} distinct distractors")
        gold = rng.randrange(n_choices)
        choices[0], choices[gold] = choices[gold], choices[0]
        out.append(MultipleChoiceExample(str(n), context, [" " + c for c in choices], gold, f"{where}#item{n}"))
    return out


class ClozeSettings(TaskSettings, Protocol):
    """What the cloze task reads besides the common settings (`EvalConfig.cloze_*`)."""

    cloze_items: int
    cloze_choices: int
    cloze_context_words: int
    cloze_continuation_words: int


def load_cloze(cfg: ClozeSettings, path: Path) -> list[MultipleChoiceExample]:
    return make_cloze_examples(
        path.read_text(encoding="utf-8"), n_items=cfg.cloze_items, n_choices=cfg.cloze_choices,
        context_words=cfg.cloze_context_words, continuation_words=cfg.cloze_continuation_words,
        seed=cfg.seed, where=str(path),
    )
