"""An lm-evaluation-harness model adapter, `illada`, so any harness task runs with our model (optional extra).

    python -m illada_lightning.evaluation.harness --model illada \\
        --model_args ckpt=runs/default,scoring_rule=confidence --tasks hellaswag,arc_challenge

or from Python: `lm_eval.simple_evaluate(model=IlladaLM(model=..., tokenizer=...), tasks=[...])`.
Needs `lm-eval` (the `harness` extra); importing this module registers the model name.

How the harness's three requests map onto a masked-diffusion model:
- `loglikelihood(context, continuation)`: the multiple-choice score of `scoring_rule` - iLLaDA's confidence
  surrogate (Eq. 2; not a likelihood, but the harness only compares candidates) or LLaDA's Monte-Carlo bound
  (Eq. 6). `is_greedy` is reported False: a diffusion model has no left-to-right greedy decode to compare to.
- `loglikelihood_rolling(text)`: the Eq. 6 bound of each `max_seq_len` chunk of the text scored on its own
  (empty context), summed; an approximation for perplexity tasks (chunks do not see the previous chunk).
- `generate_until(context, gen_kwargs)`: the diffusion sampler with `max_gen_toks` (rounded up to a whole
  number of blocks) as the generation length, one token per step, stopping at the `until` strings.
"""

from __future__ import annotations

import math
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("illada")
class IlladaLM(LM):
    def __init__(self, ckpt: str | None = None, model=None, tokenizer=None, scoring_rule: str = "confidence",
                 mc_samples: int = 128, mc_batch_size: int = 32, cfg_scale: float = 0.0, batch_size: int = 16,
                 mc_stratification: str = "uniform",
                 block_length: int = 32, device: str = "auto", seed: int = 1234, chat_template=False, **_):
        super().__init__()
        if model is None:
            if ckpt is None:
                raise ValueError("the illada harness model needs ckpt=PATH (or model= and tokenizer= objects)")
            from illada_lightning.checkpoint import load_checkpoint

            from .cli import resolve_device

            model, tokenizer = load_checkpoint(ckpt, device=resolve_device(str(device)))
        if scoring_rule not in ("confidence", "likelihood"):
            raise ValueError(f"scoring_rule={scoring_rule!r} is not 'confidence' or 'likelihood'")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.scoring_rule = scoring_rule
        self.options = dict(mc_samples=int(mc_samples), mc_batch_size=int(mc_batch_size), cfg_scale=float(cfg_scale),
                            mc_stratification=str(mc_stratification))
        self.batch_size, self.block_length, self.seed = int(batch_size), int(block_length), int(seed)
        self.chat = _as_bool(chat_template)
        self.max_len = model.config.max_seq_len

    # -- scoring ---------------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]], rule: str) -> list[float]:
        from illada_lightning.diffusion.scoring import score_batch

        options = self.options if rule == "likelihood" else {}
        generator = torch.Generator().manual_seed(self.seed)
        scores = []
        with torch.no_grad():
            for start in range(0, len(pairs), self.batch_size):
                items = [(ctx, [cont]) for ctx, cont in pairs[start:start + self.batch_size]]
                scores += [float(s[0]) for s in score_batch(self.model, items, rule=rule, generator=generator,
                                                            **options)]
        return scores

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        continuation = continuation[-self.max_len:]
        return context[-(self.max_len - len(continuation)):] if len(continuation) < self.max_len else [], continuation

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append(self._fit(self.tokenizer.encode(context), self.tokenizer.encode(continuation)))
        return [(score, False) for score in self._score(pairs, self.scoring_rule)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0])
            chunks = [([], ids[i:i + self.max_len]) for i in range(0, len(ids), self.max_len)]
            out.append(sum(self._score(chunks, "likelihood")) if chunks else 0.0)
        return out

    # -- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from illada_lightning.diffusion.sampler import generate

        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            length = int(gen_kwargs.get("max_gen_toks", 256))
            length = self.block_length * math.ceil(length / self.block_length)
            text = (self.tokenizer.format_chat([{"role": "user", "content": context}], add_generation_prompt=True)
                    if self.chat else context)
            prompt = self.tokenizer.encode(text)[-(self.max_len - length):]
            ids = generate(self.model, prompt, steps=length, gen_length=length, block_length=self.block_length,
                           stop_strings=until, tokenizer=self.tokenizer, seed=self.seed)
            answer = self.tokenizer.decode(ids)
            for stop in until:
                answer = answer.split(stop)[0] if stop else answer
            outputs.append(answer)
        return outputs

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.format_chat(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return "illada"


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
