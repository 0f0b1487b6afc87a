"""Where does variable-length generation (iLLaDA §2.3) stop? EOS placement of an SFT checkpoint.

    python -m benchmarks.sft_eos_placement --ckpt runs/window/sft --label window --out benchmarks/results/eos.jsonl

For every example of the synthetic task's test split (single-turn and dialogues, prompts through the chat
template) the model generates block by block (`variable_length=True`) until a block holds `|EOS|`. With the
reference answer of n tokens, the EOS belongs at position n, i.e. in block n // block_length. Reported:

- `eos_in_first_right_block`: share of answers whose first EOS lies in that block (generation stopped where it
  should, not a block later and not never);
- `tokens_past_answer`: mean of max(0, generated tokens before EOS - n);
- `accuracy` (exact match of the final number) with its standard error.

This measures the SFT layout ablation of iLLaDA §2.2 (`sft.data.attention=window|per_example`): a model that never
saw tokens after EOS inside its context has to fill the rest of a block after EOS only at generation time.
"""

from __future__ import annotations

import argparse
import math

import torch

from illada_lightning.checkpoint import load_checkpoint
from illada_lightning.diffusion.sampler import generate
from illada_lightning.evaluation.answers import extract_answer
from illada_lightning.evaluation.records import read_jsonl
from illada_lightning.evaluation.synthetic_task import DEFAULT_PATH, synthetic_example

from .common import emit, environment


def eos_placement(generated: list[list[int]], reference_lengths: list[int], block_length: int,
                  max_new_tokens: int) -> dict:
    """EOS-placement statistics from the generated ids (before EOS) and the reference token counts."""
    in_block, past = [], []
    for ids, n_ref in zip(generated, reference_lengths):
        stopped = len(ids) < max_new_tokens  # else the budget ran out with no EOS
        in_block.append(stopped and len(ids) // block_length == n_ref // block_length)
        past.append(max(0, len(ids) - n_ref))
    n = len(generated)
    return {"eos_in_first_right_block": sum(in_block) / n, "tokens_past_answer": sum(past) / n}


def accuracy_with_stderr(correct: list[bool]) -> tuple[float, float]:
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="SFT checkpoint (run stage directory or file)")
    ap.add_argument("--data", default=str(DEFAULT_PATH), help="synthetic test split (jsonl)")
    ap.add_argument("--label", default="", help="free text saved with the row (e.g. window / per_example)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    model, tokenizer = load_checkpoint(args.ckpt, device=device)
    examples = [synthetic_example(r, str(i)) for i, r in enumerate(read_jsonl(args.data))][: args.limit]
    records = list(read_jsonl(args.data))[: args.limit]
    prompts = [tokenizer.encode(tokenizer.format_chat(e.messages, add_generation_prompt=True)) for e in examples]
    references = [r["messages"][-1]["content"] if r.get("messages") else r["response"] for r in records]
    ref_lengths = [len(tokenizer.encode(text)) for text in references]
    generated = []
    for i in range(0, len(prompts), args.batch_size):
        generated += generate(model, prompts[i : i + args.batch_size], variable_length=True,
                              block_length=args.block_length, max_new_tokens=args.max_new_tokens,
                              steps=args.max_new_tokens, seed=0)
    generated = [g.tolist() if hasattr(g, "tolist") else list(g) for g in generated]
    correct = [extract_answer(tokenizer.decode(g)) == e.target for g, e in zip(generated, examples)]
    acc, se = accuracy_with_stderr(correct)
    row = {"bench": "sft_eos_placement", "label": args.label, "ckpt": args.ckpt, "n": len(examples),
           "block_length": args.block_length, "max_new_tokens": args.max_new_tokens,
           **eos_placement(generated, ref_lengths, args.block_length, args.max_new_tokens),
           "accuracy": acc, "accuracy_stderr": se, **environment(device)}
    print(f"{args.label or args.ckpt}: EOS in the right block {row['eos_in_first_right_block']:.1%}, "
          f"{row['tokens_past_answer']:.2f} tokens past the answer, accuracy {acc:.1%} ± {se:.1%} (n={len(examples)})")
    emit(row, args.out)


if __name__ == "__main__":
    main()
