"""A seeded synthetic instruction task with exactly checkable answers: arithmetic and small word problems.

Every example is `{"prompt", "response", "answer", "kind"}` where the response is the answer itself (a
number as text), so exact match needs no answer extraction. Kinds:

- ``add``: "What is 17 + 25?" -> "42"           - ``sub``: "What is 52 - 17?" -> "35" (never negative)
- ``mul``: "What is 17 * 8?" -> "136"            - ``word``: "Tom has 3 apples and buys 5 more. How many
  apples does Tom have?" -> "8" (a few templates: buy, give away, lose, receive)

`make_dialogues` builds 2-turn chat dialogues ("What is 3 + 4?" -> "7", "Now add 5 to that." -> "12").

Regenerate the shipped files with `python -m illada_lightning.data.synthetic --out data/instruct`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

KINDS = ("add", "sub", "mul", "word")
NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Ella", "Max", "Zoe")
ITEMS = ("apples", "pears", "books", "coins", "shells", "stamps", "marbles", "cards")

# (template, operation): {n} name, {a} first amount, {b} second amount, {i} item.
WORD_TEMPLATES = (
    ("{n} has {a} {i} and buys {b} more. How many {i} does {n} have?", "+"),
    ("{n} has {a} {i} and finds {b} more. How many {i} does {n} have now?", "+"),
    ("{n} has {a} {i} and gives {b} to a friend. How many {i} does {n} have left?", "-"),
    ("{n} had {a} {i} and lost {b} of them. How many {i} does {n} have now?", "-"),
    ("{n} buys {a} bags with {b} {i} in each bag. How many {i} does {n} buy?", "*"),
)


def _pair(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":  # up to 99 * 12: over a thousand distinct products, enough for disjoint splits
        return rng.randint(2, 99), rng.randint(2, 12)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def make_example(rng: random.Random, kind: str) -> dict:
    if kind in ("add", "sub", "mul"):
        op = {"add": "+", "sub": "-", "mul": "*"}[kind]
        a, b = _pair(rng, op)
        prompt = f"What is {a} {op} {b}?"
    elif kind == "word":
        template, op = rng.choice(WORD_TEMPLATES)
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 20), rng.randint(1, 20))
        if op == "-":
            a, b = max(a, b), min(a, b)
        prompt = template.format(n=rng.choice(NAMES), a=a, b=b, i=rng.choice(ITEMS))
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    answer = str(_apply(op, a, b))
    return {"prompt": prompt, "response": answer, "answer": answer, "kind": kind}


def make_arithmetic_examples(
    n: int, seed: int, kinds: Sequence[str] = KINDS, exclude: set[str] | None = None
) -> list[dict]:
    """`n` distinct examples (by prompt), kinds in round-robin order; prompts in `exclude` are skipped."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct examples of kinds {list(kinds)}")
        example = make_example(rng, kinds[len(out) % len(kinds)])
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
    return out


def make_dialogues(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """2-turn dialogues `{"messages": [...], "answer"}`: a sum, then a follow-up on its result."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict] = []
    while len(out) < n:
        a, b, c = rng.randint(0, 50), rng.randint(0, 50), rng.randint(1, 20)
        first = f"What is {a} + {b}?"
        follow, result = rng.choice(
            ((f"Now add {c} to that.", a + b + c), (f"Now take away {min(c, a + b)} from that.", a + b - min(c, a + b)))
        )
        key = first + " / " + follow
        if key in seen:
            continue
        seen.add(key)
        messages = [
            {"role": "user", "content": first}, {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": follow}, {"role": "assistant", "content": str(result)},
        ]
        out.append({"messages": messages, "answer": str(result), "kind": "dialogue"})
    return out


def make_splits(n_train: int, n_valid: int, n_test: int, seed: int = 0, dialogue_fraction: float = 0.1) -> dict:
    """Disjoint train/valid/test lists (no prompt appears in two splits)."""
    used: set[str] = set()
    splits = {}
    for i, (name, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        n_dialogue = int(round(n * dialogue_fraction))
        singles = make_arithmetic_examples(n - n_dialogue, seed * 1000 + i, exclude=used)
        used |= {e["prompt"] for e in singles}
        dialogues = make_dialogues(n_dialogue, seed * 1000 + 100 + i, exclude=used)
        used |= {d["messages"][0]["content"] + " / " + d["messages"][2]["content"] for d in dialogues}
        merged = singles + dialogues
        random.Random(seed * 1000 + 200 + i).shuffle(merged)
        splits[name] = merged
    return splits


def to_record(example: dict) -> dict:
    """The jsonl record: prompt/response (or messages) and kind; `answer` equals the response, so it is not stored."""
    if "messages" in example:
        return {"messages": example["messages"], "kind": example["kind"]}
    return {"prompt": example["prompt"], "response": example["response"], "kind": example["kind"]}


def write_splits(out_dir: str | Path, n_train: int = 2500, n_valid: int = 250, n_test: int = 250,
                 seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in make_splits(n_train, n_valid, n_test, seed).items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(to_record(example), separators=(",", ":")) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/instruct")
    parser.add_argument("--n-train", type=int, default=2500)
    parser.add_argument("--n-valid", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_splits(args.out, args.n_train, args.n_valid, args.n_test, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
