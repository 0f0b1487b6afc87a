"""`EvalConfig`: what to evaluate and how (the `eval` group of the experiment config).

One dataclass serves the evaluation CLI (`python -m experiments.evaluate ...`), the per-epoch callback
and sweeps. The multiple-choice scorer's settings are the nested `scoring` group
(`diffusion.scoring_config.ScoringConfig`: `scoring.rule`, `scoring.mc_samples`, `scoring.cache`, ...) and the
sampler's the nested `sampler` group (`diffusion.sampler_config.SamplerConfig`: `sampler.steps`,
`sampler.gen_length`, `sampler.cache`, `sampler.parallel`, ...): one dataclass per concept, validated by its
own `validate()`, with the evaluation defaults below (iLLaDA §2.3 / Appendix A: blocks of 32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..diffusion.sampler_config import SamplerConfig
from ..diffusion.scoring_config import ScoringConfig
from .tasks import check_task_names


def eval_sampler_defaults() -> SamplerConfig:
    """Generation tasks: 256 tokens in blocks of 32, one token per step (variable length: budget gen_length)."""
    return SamplerConfig(steps=256, gen_length=256, block_length=32)


@dataclass
class EvalConfig:
    # Registered task names (see `evaluation.tasks.registered_tasks()`); each task reads the settings below
    # through `examples.TaskSettings`.
    tasks: list[str] = field(default_factory=lambda: ["cloze"])
    # Multiple choice: `scoring.rule` = iLLaDA Eq. 2 ("confidence", the paper's default) or LLaDA Eq. 6
    # ("likelihood"; LLaDA B.6: `scoring.mc_samples=128` are enough for stable multi-token answers).
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Generation tasks (`sampler.variable_length=true`, `sampler.max_new_tokens` for open-ended answers;
    # `sampler.confidence_eos_inf=true`: LLaDA B.4, EOS revealed last, for instruct models on GSM8K).
    sampler: SamplerConfig = field(default_factory=eval_sampler_defaults)
    # First `limit` examples of each task (None: all), as lm-evaluation-harness does.
    limit: int | None = None
    seed: int = 1234
    # Few-shot examples per prompt: `num_fewshot` for every task (None: each task's own default),
    # `fewshot.<task>=k` for one task.
    num_fewshot: int | None = None
    fewshot: dict[str, int] = field(default_factory=dict)
    # Questions per scorer call / prompts per sampler call.
    batch_size: int = 16
    # Prompts through the tokenizer's chat template (instruct models). None: each task's default
    # (the synthetic instruction task uses the template, the benchmarks use plain text).
    chat_template: bool | None = None
    # Per-task data files: `data.<task>=<path>` replaces the task's default path.
    data: dict[str, str] = field(default_factory=dict)
    # Generated tasks.
    cloze_items: int = 1000  # items drawn from the corpus
    cloze_choices: int = 4  # true continuation + (cloze_choices - 1) distractors
    cloze_context_words: int = 48
    cloze_continuation_words: int = 8
    # Per-epoch callback (`evaluation.callback.PerEpochEvaluation`, attached to SFT when `per_epoch` is true):
    # every N epochs, on a fixed random subset of `subset_size` examples per task.
    per_epoch: bool = False
    every_n_epochs: int = 1
    subset_size: int | None = 200
    # Where results.json and the per-example JSONL files go (None: next to the checkpoint).
    out: str | None = None

    def fewshot_for(self, task: str, task_default: int) -> int:
        if task in self.fewshot:
            return self.fewshot[task]
        return task_default if self.num_fewshot is None else self.num_fewshot

    def validate(self) -> EvalConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"eval config: {msg}")

        need(len(self.tasks) > 0, "tasks is empty; name at least one task")
        for key in ("batch_size", "every_n_epochs", "cloze_items", "cloze_context_words", "cloze_continuation_words"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        need(self.cloze_choices >= 2, f"cloze_choices must be >= 2, got {self.cloze_choices}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1 or null, got {self.limit}")
        need(self.subset_size is None or self.subset_size >= 1,
             f"subset_size must be >= 1 or null, got {self.subset_size}")
        need(self.num_fewshot is None or self.num_fewshot >= 0, f"num_fewshot must be >= 0, got {self.num_fewshot}")
        for task, k in self.fewshot.items():
            need(k >= 0, f"fewshot.{task} must be >= 0, got {k}")
        for group in (self.scoring, self.sampler):
            try:
                group.validate()
            except ValueError as exc:
                raise ValueError(f"eval config: {exc}") from None
        # The registry owns the task names (tasks never import this config): a typo fails before a model loads.
        check_task_names([*self.tasks, *self.data, *self.fewshot])
        return self

    def sampler_options(self) -> dict:
        """Keyword arguments for `generate(model, prompts, **options)`: the `sampler` group (its seed: `seed`)."""
        options = asdict(self.sampler)
        if options["seed"] is None:
            options["seed"] = self.seed
        return options

    def scoring_options(self) -> dict:
        """Keyword arguments for `score_batch(model, items, **options)`: the `scoring` group (seed: `seed`)."""
        options = asdict(self.scoring)
        if options["seed"] is None:
            options["seed"] = self.seed
        return options

    @property
    def generation_budget(self) -> int:
        """Most tokens one answer may take (room to leave after the prompt)."""
        return self.sampler.budget
