"""`evaluate(model, tokenizer, task_names, cfg)`: run registered tasks and return their metrics.

Per task: build the examples (`tasks.py`), keep the first `limit` (and/or a fixed seeded subset, for the
per-epoch callback), keep this rank's shard, skip the examples already in the per-example outputs file
(resume), then
- multiple choice: tokenise context and continuations, score `batch_size` questions per scorer call, predict
  the argmax; `acc` from raw scores and `acc_norm` from scores divided by each continuation's length in bytes
  (lm-evaluation-harness's normalisation, which undoes the sum-of-log-probs penalty on long answers);
- generation: render the prompt (plain text or chat template), generate `batch_size` prompts per sampler call,
  extract the answer, `exact_match` against the target.
Every accuracy comes with its binomial standard error (`metrics.py`). Results:
`{task: {"acc": .., "acc_stderr": .., ..., "n": .., "seconds": ..}}`.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .backends import AnswerGenerator, ChoiceScorer, model_generator, model_scorer
from .config import EvalConfig
from .examples import GenerationExample, MultipleChoiceExample
from .metrics import accuracy_with_stderr
from .outputs import ExampleOutputs
from .tasks import MULTIPLE_CHOICE, Task, get_task

log = logging.getLogger(__name__)


def evaluate(
    model,
    tokenizer,
    task_names: list[str] | None = None,
    cfg: EvalConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    scorer: ChoiceScorer | None = None,
    generator: AnswerGenerator | None = None,
    subset_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    model_id: str = "",
) -> dict[str, dict[str, float]]:
    """Evaluate `model` on `task_names` (default `cfg.tasks`). `out_dir`: where `<task>.examples.jsonl` go (and
    are resumed from). `scorer`/`generator`: replace the model calls (tests, custom backends). `rank`,
    `world_size`: evaluate one shard and gather the metrics over `torch.distributed` (every rank must call).
    `model_id` (e.g. the checkpoint path) is stored with the outputs so a resume never mixes two models."""
    cfg = (cfg or EvalConfig()).validate()
    task_names = list(task_names or cfg.tasks)
    max_len = model.config.max_seq_len if model is not None else None
    results = {}
    with eval_mode(model):
        for name in task_names:
            task = get_task(name)
            start = time.perf_counter()
            examples = select_examples(task.examples(cfg), cfg.limit, subset_size, cfg.seed)[rank::world_size]
            path = None
            if out_dir is not None:
                suffix = f".rank{rank}" if world_size > 1 else ""
                path = Path(out_dir) / f"{name}{suffix}.examples.jsonl"
            outputs = ExampleOutputs(path, output_settings(task, cfg, model_id))
            if task.kind == MULTIPLE_CHOICE:
                # A fresh model scorer per task: its seeded Monte-Carlo generator (likelihood rule) then does
                # not depend on which tasks ran before. (A resumed run draws other masks for the remaining
                # examples than an uninterrupted one would: same estimator, different samples.)
                task_scorer = scorer or model_scorer(model, cfg)
                records = run_multiple_choice(examples, tokenizer, task_scorer, cfg.batch_size, max_len, outputs,
                                              chat=task.uses_chat(cfg))
                metrics = {**accuracy_with_stderr([r["correct"] for r in records], "acc", sync=world_size > 1),
                           **accuracy_with_stderr([r["correct_norm"] for r in records], "acc_norm",
                                                  sync=world_size > 1)}
            else:
                task_generator = generator or model_generator(model, tokenizer, cfg)
                records = run_generation(examples, task, task.uses_chat(cfg), tokenizer, task_generator, cfg.batch_size,
                                         max_len, cfg.generation_budget, outputs)
                metrics = accuracy_with_stderr([r["correct"] for r in records], "exact_match", sync=world_size > 1)
            metrics["seconds"] = time.perf_counter() - start
            results[name] = metrics
            log.info("%s: %s", name, format_metrics(metrics))
    return results


def select_examples(examples: list, limit: int | None, subset_size: int | None, seed: int) -> list:
    """The first `limit` examples, then a fixed seeded subset of `subset_size` of them (kept in order)."""
    if limit is not None:
        examples = examples[:limit]
    if subset_size is not None and subset_size < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), subset_size))
        examples = [examples[i] for i in keep]
    return examples


def output_settings(task: Task, cfg: EvalConfig, model_id: str) -> dict:
    """Everything that changes a task's per-example outputs: a resume must match all of it.

    `limit` and `subset_size` are not among them on purpose: they choose which examples count, not what an
    example's record holds; records are looked up by doc_id, so a resume with a larger limit scores only the
    missing examples and a smaller one reports exactly its own (tests/test_crash_eval_limit.py)."""
    settings = dict(task=task.name, model=model_id, seed=cfg.seed, fewshot=cfg.fewshot_for(task.name, task.num_fewshot),
                    data=str(cfg.data.get(task.name, task.default_path)))
    if task.kind == MULTIPLE_CHOICE:
        scoring = cfg.scoring_options()
        settings.update(scoring_rule=scoring["rule"], cfg_scale=scoring["cfg_scale"])
        if task.chat:  # only tasks that can use the template: other tasks' saved outputs stay resumable
            settings.update(chat=task.uses_chat(cfg))
        if scoring["rule"] == "likelihood":
            settings.update(mc_samples=scoring["mc_samples"], mc_batch_size=scoring["mc_batch_size"],
                            mc_stratification=scoring["mc_stratification"])
        else:
            settings.update(cache=scoring["cache"], parallel=scoring["parallel"], threshold=scoring["threshold"])
    else:
        settings.update(chat=task.uses_chat(cfg), **cfg.sampler_options())
    if task.name == "cloze":
        settings.update({k: getattr(cfg, k) for k in ("cloze_items", "cloze_choices", "cloze_context_words",
                                                      "cloze_continuation_words")})
    return settings


@contextmanager
def eval_mode(model):
    """Eval mode and no autograd for the duration; the previous training mode comes back afterwards."""
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if model is not None and was_training:
            model.train()


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def truncate_left(ids: list[int], room: int) -> list[int]:
    return ids[-room:] if room > 0 else []


def run_multiple_choice(examples: list[MultipleChoiceExample], tokenizer, scorer: ChoiceScorer, batch_size: int,
                        max_len: int | None, outputs: ExampleOutputs, chat: bool = False) -> list[dict]:
    """`chat`: examples with `messages` are scored after their chat-formatted turns (the reply's place)."""
    todo = [e for e in examples if not outputs.done(e.doc_id)]
    n_truncated = 0
    for batch in batches(todo, batch_size):
        items = []
        if chat:
            batch = [replace(ex, context=tokenizer.format_chat(ex.messages, add_generation_prompt=True))
                     if ex.messages else ex for ex in batch]
        for ex in batch:
            context = tokenizer.encode(ex.context)
            candidates = [tokenizer.encode(c) for c in ex.continuations]
            if any(len(c) == 0 for c in candidates):
                raise ValueError(f"{ex.where}: a continuation encodes to zero tokens: {ex.continuations}")
            if max_len is not None and len(context) + max(map(len, candidates)) > max_len:
                # Keep the end of the context: the words next to the answer matter most.
                context = truncate_left(context, max_len - max(map(len, candidates)))
                n_truncated += 1
            items.append((context, candidates))
        scores = scorer(items)
        if len(scores) != len(batch):
            raise ValueError(f"scorer returned {len(scores)} score lists for {len(batch)} questions")
        outputs.append([multiple_choice_record(ex, s) for ex, s in zip(batch, scores)])
    if n_truncated:
        log.warning("%d contexts were cut from the left to fit max_seq_len=%s", n_truncated, max_len)
    return outputs.records_for(e.doc_id for e in examples)


def multiple_choice_record(ex: MultipleChoiceExample, scores: list[float]) -> dict:
    if len(scores) != len(ex.continuations):
        raise ValueError(f"{ex.where}: scorer returned {len(scores)} scores for {len(ex.continuations)} choices")
    normed = [s / max(len(c.encode("utf-8")), 1) for s, c in zip(scores, ex.continuations)]
    prediction = max(range(len(scores)), key=scores.__getitem__)
    prediction_norm = max(range(len(normed)), key=normed.__getitem__)
    return dict(doc_id=ex.doc_id, where=ex.where, prompt=ex.context, candidates=ex.continuations, scores=scores,
                prediction=prediction, prediction_norm=prediction_norm, target=ex.gold,
                correct=prediction == ex.gold, correct_norm=prediction_norm == ex.gold)


def run_generation(examples: list[GenerationExample], task: Task, chat: bool, tokenizer,
                   generator: AnswerGenerator, batch_size: int, max_len: int | None, budget: int,
                   outputs: ExampleOutputs) -> list[dict]:
    if max_len is not None and budget >= max_len:
        raise ValueError(f"task '{task.name}': the generation budget ({budget} tokens: gen_length, or max_new_tokens "
                         f"with variable_length) leaves no room for a prompt in max_seq_len={max_len}")
    todo = [e for e in examples if not outputs.done(e.doc_id)]
    stops = () if chat else task.stop_strings
    for batch in batches(todo, batch_size):
        texts = [tokenizer.format_chat(e.messages, add_generation_prompt=True) if chat else e.prompt for e in batch]
        prompts = [tokenizer.encode(t) for t in texts]
        if max_len is not None:
            prompts = [truncate_left(p, max_len - budget) for p in prompts]
        generated = generator(prompts, stop_strings=stops)
        records = []
        for ex, text, ids in zip(batch, texts, generated):
            output = tokenizer.decode(ids)
            prediction = task.extract(output)
            records.append(dict(doc_id=ex.doc_id, where=ex.where, prompt=text, output=output,
                                prediction=prediction, target=ex.target,
                                correct=prediction != "" and prediction == ex.target))
        outputs.append(records)
    return outputs.records_for(e.doc_id for e in examples)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
