"""Generate from a checkpoint with the diffusion sampler, once or as a multi-turn chat.

    python -m experiments.generate ckpt=runs/default prompt="What is 12 + 30?"
    python -m experiments.generate ckpt=runs/default prompt="To be, or" chat_template=false sampler.gen_length=64
    python -m experiments.generate ckpt=runs/default chat=true      # type messages; empty line or /exit quits
    python -m experiments.generate --show-config                    # every key and its default; runs nothing

Sampler options are the `sampler.*` keys (`illada_lightning.diffusion.sampler.SamplerConfig`): steps,
gen_length, block_length, remasking, temperature, cfg_scale, variable_length, max_new_tokens, ...
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] in (["-h"], ["--help"]):  # answered before torch is imported
    print(__doc__)
    sys.exit(0)

from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from illada_lightning.budget import budget_note, fit_sampler, trained_context  # noqa: E402
from illada_lightning.config import SHOW_CONFIG, ConfigError, load_config, show_config  # noqa: E402
from illada_lightning.diffusion.sampler_config import SamplerConfig  # noqa: E402  (no torch: typos answer fast)
from illada_lightning.logs import configure_logging  # noqa: E402


@dataclass
class GenerateConfig:
    ckpt: str = ""  # run directory or checkpoint file
    prompt: str | None = None
    chat: bool = False  # interactive multi-turn chat (keeps the history, applies the chat template)
    chat_template: bool = True  # wrap a single prompt as a user turn of the chat template
    system: str | None = None  # optional system message
    device: str = "auto"
    # Budget: gen_length tokens, shortened to what the checkpoint was trained for. Blocks of 4: small models
    # fine-tuned on whole windows answer cleanly with short blocks (pass sampler.block_length=32 for the
    # paper's setting on large models).
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(
        steps=128, gen_length=128, block_length=4, variable_length=True))

    def validate(self) -> GenerateConfig:
        if not self.ckpt:
            raise ValueError("ckpt= is required (a run directory or a checkpoint file)")
        if not self.chat and not self.prompt:
            raise ValueError('give prompt="..." or chat=true')
        if not Path(self.ckpt).exists():
            raise ValueError(f"ckpt={self.ckpt}: no such file or directory (a run directory or a checkpoint file)")
        return self


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def sampler_options(model, n_prompt: int, cfg: GenerateConfig, context: int | None = None) -> dict:
    """The sampler options, with a budget that would run past the context the checkpoint was trained on
    (`context`, default the model's `max_seq_len`) shortened to what fits after the prompt, by the rule
    evaluation and the preview use (`illada_lightning/budget.py: fit_sampler`), said on stderr."""
    context = context or model.config.max_seq_len
    room = context - n_prompt
    sampler, what = fit_sampler(cfg.sampler, room) if room > 0 else (cfg.sampler, None)
    if what is not None:
        print(budget_note(what, (cfg.sampler.budget, cfg.sampler.steps), (sampler.budget, sampler.steps), context,
                          f", prompt {n_prompt} tokens"), file=sys.stderr)
    return asdict(sampler)


def generate_text(model, tokenizer, text: str, cfg: GenerateConfig) -> str:
    import torch

    from illada_lightning.diffusion.sampler import generate

    ids = torch.tensor(tokenizer.encode(text), device=next(model.parameters()).device)
    context = trained_context(cfg.ckpt, model.config.max_seq_len) if cfg.ckpt else None
    out = generate(model, ids, tokenizer=tokenizer, **sampler_options(model, len(ids), cfg, context))
    return tokenizer.decode(out).strip()


def reply(model, tokenizer, messages: list[dict], cfg: GenerateConfig) -> str:
    """One assistant turn for the conversation so far (the chat template of data/tokenizer.py)."""
    return generate_text(model, tokenizer, tokenizer.format_chat(messages, add_generation_prompt=True), cfg)


def complete(model, tokenizer, prompt: str, cfg: GenerateConfig) -> str:
    if cfg.chat_template:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
        return reply(model, tokenizer, messages + [{"role": "user", "content": prompt}], cfg)
    return generate_text(model, tokenizer, prompt, cfg)


def chat_loop(model, tokenizer, cfg: GenerateConfig, read=input, write=print) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    while True:
        try:
            user = read("you> ").strip()
        except EOFError:
            break
        if not user or user == "/exit":
            break
        messages.append({"role": "user", "content": user})
        answer = reply(model, tokenizer, messages, cfg)
        messages.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
    return messages


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if SHOW_CONFIG in argv:
        print(show_config(GenerateConfig, None, [a for a in argv if a != SHOW_CONFIG]), end="")
        return 0
    configure_logging()
    cfg = load_config(GenerateConfig, None, argv)
    from illada_lightning.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(cfg.ckpt, device=_device(cfg.device))
    if tokenizer is None:
        raise ConfigError(f"no tokenizer found with checkpoint {cfg.ckpt}")
    if cfg.chat:
        chat_loop(model, tokenizer, cfg)
    else:
        print(complete(model, tokenizer, cfg.prompt, cfg))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
