"""The task registry: every evaluation task by name, and the one multiple-choice pipeline they share.

A task turns the evaluation settings (`examples.TaskSettings`, which `EvalConfig` satisfies) into a list of
examples (`examples.py`): `MultipleChoiceExample`s, scored with
either rule of iLLaDA §2.3 / LLaDA Eq. 6, or `GenerationExample`s, answered with the sampler and compared by
exact match. A new multiple-choice benchmark is one adapter in `formats.py` plus one `multiple_choice_task` call
here; any other task is `register_task(Task(name, kind, load, ...))` with `load(settings, path) -> examples`.
The registry owns the task names: `EvalConfig.validate` asks it (`check_task_names`); tasks never import the
config.

Default data paths point into `../shared/data/` beside the repository (see its README); a user points a task
elsewhere with `data.<task>=PATH`. Relative paths resolve against the working directory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import answers, formats
from .examples import GenerationExample, MultipleChoiceExample, TaskSettings
from .records import EvalDataError, Record, read_csv, read_jsonl, read_lines, require_file

Example = MultipleChoiceExample | GenerationExample
# Where the staged public data sets live: `../shared/data` next to the repository root.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generation"


class UnknownTaskError(ValueError):
    pass


@dataclass
class Task:
    name: str
    kind: str  # MULTIPLE_CHOICE | GENERATION
    load: Callable[[TaskSettings, Path | None], list]  # (settings, data path) -> examples
    default_path: Path | None = None  # None: the task generates its data (a path is optional)
    expects: str = ""  # what file the task reads, for error messages
    num_fewshot: int = 0
    chat: bool = False  # prompts through the chat template by default (instruct-style tasks)
    extract: Callable[[str], str] = answers.extract_answer  # generation: model output -> answer
    stop_strings: tuple[str, ...] = ()  # generation with plain-text prompts: where the answer has ended

    def data_path(self, cfg: TaskSettings) -> Path | None:
        if self.name in cfg.data:
            return require_file(cfg.data[self.name], self.name, self.expects)
        if self.default_path is None:
            return None
        return require_file(self.default_path, self.name, self.expects)

    def examples(self, cfg: TaskSettings) -> list[Example]:
        return self.load(cfg, self.data_path(cfg))

    def uses_chat(self, cfg: TaskSettings) -> bool:
        return self.chat if cfg.chat_template is None else cfg.chat_template


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"task '{task.name}' is already registered")
    if task.kind not in (MULTIPLE_CHOICE, GENERATION):
        raise ValueError(f"task '{task.name}': kind {task.kind!r} is not {MULTIPLE_CHOICE!r} or {GENERATION!r}")
    _REGISTRY[task.name] = task
    return task


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    check_task_names([name])
    return _REGISTRY[name]


def check_task_names(names) -> None:
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise UnknownTaskError(
            f"unknown evaluation task(s) {unknown}; registered tasks: {', '.join(registered_tasks())}"
        )


# ---------------------------------------------------------------------------------------------------------
# The multiple-choice pipeline: records -> adapter -> checked example -> few-shot context.

Reader = Callable[[Path], Iterator[Record]]
Adapter = Callable[[Record], formats.Adapted]


def adapt_records(records, adapter: Adapter) -> list[MultipleChoiceExample]:
    out = []
    for i, record in enumerate(records):
        context, continuations, gold = adapter(record)
        if not 0 <= gold < len(continuations):
            raise record.error(f"label out of range: {gold} for {len(continuations)} choices")
        out.append(MultipleChoiceExample(str(i), context, continuations, gold, record.where))
    if not out:
        raise EvalDataError("no examples found (empty file?)")
    return out


def with_fewshot(examples: list[MultipleChoiceExample], pool: list[MultipleChoiceExample] | None,
                 k: int, seed: int) -> list[MultipleChoiceExample]:
    """Prefix each context with k solved examples (context + gold continuation, blank line between), drawn
    from `pool` (the train split) or, without one, from the evaluated set minus the example itself, as
    lm-evaluation-harness does. Seeded per example so a subset or a resumed run sees the same prompts."""
    if k == 0:
        return examples
    out = []
    for ex in examples:
        candidates = pool if pool is not None else [e for e in examples if e.doc_id != ex.doc_id]
        if len(candidates) < k:
            raise EvalDataError(f"{k}-shot prompts need {k} other examples, only {len(candidates)} available")
        shots = random.Random(f"{seed}:{ex.doc_id}").sample(candidates, k)
        prefix = "".join(s.context + s.continuations[s.gold] + "\n\n" for s in shots)
        out.append(MultipleChoiceExample(ex.doc_id, prefix + ex.context, ex.continuations, ex.gold, ex.where))
    return out


def multiple_choice_task(name: str, adapter: Adapter, default_path: Path, expects: str, *,
                         reader: Reader = read_jsonl, train_path: Callable[[Path], Path] | None = None,
                         num_fewshot: int = 0) -> Task:
    """A registered multiple-choice task from a format adapter; the train split (for few-shot) is the file
    `train_path(eval_path)` when it exists."""

    def load(cfg: TaskSettings, path: Path) -> list[MultipleChoiceExample]:
        examples = adapt_records(reader(path), adapter)
        k = cfg.fewshot_for(name, num_fewshot)
        train = train_path(path) if train_path is not None else None
        pool = adapt_records(reader(train), adapter) if k and train is not None and train.exists() else None
        return with_fewshot(examples, pool, k, cfg.seed)

    return register_task(Task(name, MULTIPLE_CHOICE, load, default_path, expects, num_fewshot))


def read_piqa(path: Path) -> Iterator[Record]:
    """PIQA ships labels apart from the questions: `X-labels.lst` beside `X.jsonl`, one 0/1 a line."""
    labels_path = path.with_name(path.stem + "-labels.lst")
    require_file(labels_path, "piqa", f"the labels file {labels_path.name} beside {path.name} (one 0 or 1 a line)")
    labels = read_lines(labels_path)
    records = list(read_jsonl(path))
    if len(labels) != len(records):
        raise EvalDataError(f"{labels_path}: {len(labels)} labels for {len(records)} questions in {path}")
    for record, label in zip(records, labels):
        record.data = {**record.data, "label": label}
        yield record


def read_mmlu(path: Path) -> Iterator[Record]:
    """One MMLU csv (no header), or a directory of them (`<subject>_test.csv`, read in name order)."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise EvalDataError(f"{path}: directory holds no .csv files")
    for file in files:
        for record in read_csv(file):
            if len(record.data) != 6:
                raise record.error(f"expected 6 columns (question, A, B, C, D, answer), got {len(record.data)}")
            yield record


# ---------------------------------------------------------------------------------------------------------
# Built-in tasks.

multiple_choice_task(
    "hellaswag", formats.hellaswag, SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl",
    "HellaSwag jsonl (hellaswag_val.jsonl from rowanz/hellaswag): one object a line with 'ctx' (or 'ctx_a' and "
    "'ctx_b'), 'endings' (4 strings), 'label' (0-3), optionally 'activity_label'",
    train_path=lambda p: p.with_name("hellaswag_train.jsonl"),
)
for _variant in ("Challenge", "Easy"):
    multiple_choice_task(
        f"arc_{_variant.lower()}", formats.arc, SHARED_DATA / f"arc_{_variant.lower()}" / f"ARC-{_variant}-Test.jsonl",
        f"AI2 ARC-{_variant} jsonl (ARC-{_variant}-Test.jsonl): one object a line with 'question': {{'stem', "
        "'choices': [{'text', 'label'}]}, and 'answerKey' (a letter A-E or a digit 1-5)",
        train_path=lambda p: p.with_name(p.name.replace("-Test", "-Train")),
    )
multiple_choice_task(
    "piqa", formats.piqa, SHARED_DATA / "piqa" / "valid.jsonl",
    "PIQA valid.jsonl (objects with 'goal', 'sol1', 'sol2') with valid-labels.lst beside it (one 0/1 a line)",
    reader=read_piqa, train_path=lambda p: p.with_name("train.jsonl"),
)
multiple_choice_task(
    "mmlu", formats.mmlu, SHARED_DATA / "mmlu" / "test",
    "MMLU csv without header (question, A, B, C, D, answer letter): one file or a directory of "
    "<subject>_test.csv files", reader=read_mmlu,
    train_path=lambda p: (p.parent / "dev") if p.is_dir() else p.with_name(p.name.replace("_test", "_dev")),
)


def load_gsm8k(cfg: TaskSettings, path: Path) -> list[GenerationExample]:
    """GSM8K: `Question: ...\\nAnswer:` prompts, k solved train-split examples first (LLaDA Table 1: 4-shot);
    the reference is the number after `####`; few-shot solutions lose their `<<calculator>>` annotations."""
    records = list(read_jsonl(path))
    k = cfg.fewshot_for("gsm8k", GSM8K_FEWSHOT)
    train_file = path.with_name("train.jsonl")
    pool = list(read_jsonl(train_file)) if k else []
    if k and len(pool) < k:
        raise EvalDataError(f"gsm8k: {k}-shot prompts need {train_file} with at least {k} records")
    out = []
    for i, record in enumerate(records):
        target = answers.reference_answer(record["answer"])
        if target == "":
            raise record.error("field 'answer' has no final number after '####'")
        shots = random.Random(f"{cfg.seed}:{i}").sample(pool, k) if k else []
        solved = [(s["question"], answers.strip_calculator(s["answer"])) for s in shots]
        prompt = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in solved)
        prompt += f"Question: {record['question']}\nAnswer:"
        messages = [m for q, a in solved for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": record["question"]})
        out.append(GenerationExample(str(i), prompt, target, messages, record.where))
    return out


GSM8K_FEWSHOT = 4
register_task(Task(
    "gsm8k", GENERATION, load_gsm8k, SHARED_DATA / "gsm8k" / "test.jsonl",
    "GSM8K jsonl (test.jsonl, with train.jsonl beside it for few-shot prompts): one object a line with "
    "'question' and 'answer' (solution ending in '#### <number>')",
    num_fewshot=GSM8K_FEWSHOT,
    extract=lambda text: answers.extract_answer(answers.truncate_at_stop(text)),
    stop_strings=("Question:",),
))


def _register_generated_tasks() -> None:
    from .cloze import load_cloze
    from .synthetic_task import DEFAULT_PATH, load_synthetic, load_synthetic_choice

    register_task(Task(
        "cloze", MULTIPLE_CHOICE, load_cloze, SHARED_DATA / "wikitext-2" / "valid.txt",
        "a held-out plain-text corpus (e.g. wikitext-2/valid.txt): WikiText articles or blank-line-separated "
        "paragraphs",
    ))
    register_task(Task(
        "synthetic", GENERATION, load_synthetic, DEFAULT_PATH,
        "a test split written by `python -m illada_lightning.data.synthetic --out DIR` (jsonl with "
        "'prompt'/'response' or chat 'messages')",
        chat=True,
    ))
    register_task(Task(
        "synthetic_choice", MULTIPLE_CHOICE, load_synthetic_choice, DEFAULT_PATH,
        "a test split written by `python -m illada_lightning.data.synthetic --out DIR` (the synthetic task's "
        "file; each result is scored among near-miss distractors)",
        chat=True,
    ))


_register_generated_tasks()
