"""`EvalConfig`: what to evaluate and how (the `eval` group of the experiment config).

One dataclass serves the evaluation CLI (`python -m experiments.evaluate ...`), the per-epoch callback
and sweeps. Key names are the papers' words and the argument names of the functions they feed:
`scoring_rule`, `mc_samples`, `mc_batch_size`, `cfg_scale` go to the multiple-choice scorer
(`diffusion/scoring.py`); `steps`, `gen_length`, `block_length`, `remasking`, `temperature`,
`variable_length`, `max_new_tokens` go to the sampler (`diffusion/sampler.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diffusion.likelihood import STRATIFICATIONS

SCORING_RULES = ("confidence", "likelihood")
REMASKING = ("low_confidence", "random")


@dataclass
class EvalConfig:
    # Registered task names (see `evaluation.tasks.registered_tasks()`).
    tasks: list[str] = field(default_factory=lambda: ["cloze"])
    # Multiple choice: iLLaDA Eq. 2 ("confidence", the paper's default) or LLaDA Eq. 6 ("likelihood").
    scoring_rule: str = "confidence"
    mc_samples: int = 128  # LLaDA B.6: 128 Monte-Carlo samples are enough for stable multi-token answers
    mc_batch_size: int = 32
    # Mask counts of the likelihood rule: "uniform" (Eq. 6 as written, unbiased) or "llada_released" (the
    # rounding of LLaDA's eval_llada.py, to match published numbers; see diffusion/likelihood.py).
    mc_stratification: str = "uniform"
    cfg_scale: float = 0.0
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
    # Generation tasks (iLLaDA §2.3 and Appendix A: block length 32; variable length for open-ended answers).
    gen_length: int = 256
    block_length: int = 32
    steps: int = 256
    remasking: str = "low_confidence"
    temperature: float = 0.0
    variable_length: bool = False
    max_new_tokens: int = 512  # variable_length only: the generation budget
    confidence_eos_inf: bool = False  # LLaDA B.4: EOS revealed last (instruct models on GSM8K)
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
        need(self.scoring_rule in SCORING_RULES, f"scoring_rule={self.scoring_rule!r} is not one of {SCORING_RULES}")
        need(self.mc_stratification in STRATIFICATIONS,
             f"mc_stratification={self.mc_stratification!r} is not one of {STRATIFICATIONS}")
        need(self.remasking in REMASKING, f"remasking={self.remasking!r} is not one of {REMASKING}")
        for key in ("mc_samples", "mc_batch_size", "batch_size", "gen_length", "block_length", "steps",
                    "max_new_tokens", "every_n_epochs", "cloze_items", "cloze_context_words",
                    "cloze_continuation_words"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        need(self.cloze_choices >= 2, f"cloze_choices must be >= 2, got {self.cloze_choices}")
        need(self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1 or null, got {self.limit}")
        need(self.subset_size is None or self.subset_size >= 1,
             f"subset_size must be >= 1 or null, got {self.subset_size}")
        need(self.num_fewshot is None or self.num_fewshot >= 0, f"num_fewshot must be >= 0, got {self.num_fewshot}")
        for task, k in self.fewshot.items():
            need(k >= 0, f"fewshot.{task} must be >= 0, got {k}")
        need(self.variable_length or self.gen_length % self.block_length == 0,
             f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}")
        # Task names are checked against the registry here so a typo fails before a model is loaded.
        from .tasks import check_task_names

        check_task_names([*self.tasks, *self.data, *self.fewshot])
        return self

    def sampler_options(self) -> dict:
        """Keyword arguments for `generate(model, prompts, **options)` (see `diffusion.sampler.SamplerConfig`)."""
        options = dict(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                       remasking=self.remasking, temperature=self.temperature, cfg_scale=self.cfg_scale,
                       variable_length=self.variable_length, confidence_eos_inf=self.confidence_eos_inf,
                       seed=self.seed)
        if self.variable_length:
            options["max_new_tokens"] = self.max_new_tokens
        return options

    @property
    def generation_budget(self) -> int:
        """Most tokens one answer may take (room to leave after the prompt)."""
        return self.max_new_tokens if self.variable_length else self.gen_length
