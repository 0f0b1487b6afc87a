"""A seeded synthetic instruction family with exactly checkable answers: reading, arithmetic, word problems.

Every example is `{"prompt", "response", "answer", "kind"}` where the response is the answer itself (a
number as text), so exact match needs no answer extraction. Kinds, from easy to hard for a small model:

- ``copy``: "Repeat 938." -> "938"                 - ``next``: "What number comes after 347?" -> "348"
- ``max``: "Which is larger, 706 or 838?" -> "838"
- ``add``: "What is 17 + 25?" -> "42"              - ``sub``: "What is 52 - 17?" -> "35" (never negative)
- ``mul``: "What is 17 * 8?" -> "136" (times one digit) - ``word``: "Tom has 3 apples and buys 5 more. How
  many apples does Tom have?" -> "8" (a few templates: buy, find, give away, lose, bags of)

Difficulty: the mix of kinds and `digits`, the number of digits of every number in a problem, operands and
result alike (a multiplier has one digit). Measured with the tiny model (2.4M parameters, response-only SFT
from random weights, 1,500 steps of 16 on 2 CPU cores): copy 98 %, next 97 %, max 18 % held-out exact match at
3 digits; 2-digit add and sub stay near 3 % in that budget (the ``small`` GPU recipe's territory).

Held-out splits by construction: every problem (operation and operands; unordered for +, * and max, so
"3 + 5" and "5 + 3" are one problem, and "What number comes after 7?" is the problem 7 + 1) goes to train,
valid or test by a hash of itself (`split_of`), not by the draw. Any number of training examples from any seed
therefore never shares a problem with the test split (`--repeat-train` lets a train split repeat its problems).

`make_dialogues` builds 2-turn chat dialogues ("What is 3 + 4?" -> "7", "Now add 5 to that." -> "12").
`multiple_choice` turns an example into the correct result among distractors (the scoring-rule ablation).

Regenerate the shipped files with the command in `data/instruct/README.md`; larger sets (a GPU run's SFT)
with e.g. `python -m illada_lightning.data.synthetic --out DIR --kinds copy,next,max,add --digits 3
--n-train 40000 --repeat-train`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

KINDS = ("add", "sub", "mul", "word", "copy", "next", "max")
SHIPPED_KINDS = ("copy", "next", "max")  # data/instruct: the easy end, what the default job learns on a CPU
SHIPPED_DIGITS = 3
SPLITS = ("train", "valid", "test")
HOLDOUT = 0.1  # fraction of all problems in the valid split, and again in the test split
NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Ella", "Max", "Zoe")
ITEMS = ("apples", "pears", "books", "coins", "shells", "stamps", "marbles", "cards")
OPS = {"add": "+", "sub": "-", "mul": "*"}
# Kinds that read one number (or compare two) rather than compute: (prompt template, operation).
READING = {
    "copy": ("Repeat {a}.", "="),
    "next": ("What number comes after {a}?", "+"),  # the problem a + 1: the same problem as "What is a + 1?"
    "max": ("Which is larger, {a} or {b}?", "max"),
}

# (template, operation): {n} name, {a} first amount, {b} second amount, {i} item.
WORD_TEMPLATES = (
    ("{n} has {a} {i} and buys {b} more. How many {i} does {n} have?", "+"),
    ("{n} has {a} {i} and finds {b} more. How many {i} does {n} have now?", "+"),
    ("{n} has {a} {i} and gives {b} to a friend. How many {i} does {n} have left?", "-"),
    ("{n} had {a} {i} and lost {b} of them. How many {i} does {n} have now?", "-"),
    ("{n} buys {a} bags with {b} {i} in each bag. How many {i} does {n} buy?", "*"),
)


def check_task(kinds: Sequence[str], digits: int) -> None:
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    if not kinds:
        raise ValueError(f"kinds is empty; choose from {KINDS}")
    if not 1 <= digits <= 9:
        raise ValueError(f"digits must be in 1..9, got {digits}")


def split_of(op: str, a: int, b: int) -> str:
    """The split a problem belongs to: a fixed hash of (op, operands), HOLDOUT each for test and valid."""
    x, y = (min(a, b), max(a, b)) if op in ("+", "*", "max") else (a, b)
    h = int.from_bytes(hashlib.sha256(f"{op} {x} {y}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < HOLDOUT else "valid" if h < 2 * HOLDOUT else "train"


def _width(digits: int) -> tuple[int, int]:
    """The smallest and largest number with `digits` digits (0..9 for one)."""
    return (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1


def _pair(rng: random.Random, op: str, digits: int) -> tuple[int, int]:
    """Operands with `digits` digits whose result has `digits` digits too (a multiplier has one digit)."""
    low, top = _width(digits)
    while True:
        if op == "*":
            a, b = rng.randint(max(low, 2), top), rng.randint(2, 9)
        elif op == "=":
            a, b = rng.randint(low, top), 0
        else:
            a, b = rng.randint(low, top), rng.randint(low, top)
            a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        if low <= _apply(op, a, b) <= top:
            return a, b


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "max": max(a, b), "=": a}[op]


def make_example(rng: random.Random, kind: str, digits: int = 2) -> dict:
    if kind in OPS:
        op = OPS[kind]
        a, b = _pair(rng, op, digits)
        prompt = f"What is {a} {op} {b}?"
    elif kind == "word":
        template, op = rng.choice(WORD_TEMPLATES)
        a, b = _pair(rng, op, digits)
        prompt = template.format(n=rng.choice(NAMES), a=a, b=b, i=rng.choice(ITEMS))
    elif kind in READING:
        template, op = READING[kind]
        low, top = _width(digits)
        a = rng.randint(low, top - 1 if kind == "next" else top)  # a + 1 keeps `digits` digits
        b = {"copy": 0, "next": 1}.get(kind)
        while b is None or (kind == "max" and b == a):
            b = rng.randint(low, top)
        prompt = template.format(a=a, b=b)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    answer = str(_apply(op, a, b))
    return {"prompt": prompt, "response": answer, "answer": answer, "kind": kind, "split": split_of(op, a, b)}


def _draw(n: int, what: str, draw, seen: set[str], key) -> list[dict]:
    """`n` draws of `draw(i)` that are not None, distinct by `key` and not in `seen` (`key` None: repeats
    allowed); bounded so a small space fails clearly."""
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 2000:
            raise ValueError(f"cannot draw {n} distinct {what}: the problem space is too small "
                             f"(raise digits, add kinds, or ask for fewer)")
        example = draw(len(out))
        if example is None or (key is not None and key(example) in seen):
            continue
        if key is not None:
            seen.add(key(example))
        out.append(example)
    return out


def make_arithmetic_examples(n: int, seed: int, kinds: Sequence[str] = SHIPPED_KINDS, exclude: set[str] | None = None,
                             *, digits: int = SHIPPED_DIGITS, split: str | None = None, distinct: bool = True) -> list[dict]:
    """`n` distinct examples (by prompt), kinds in round-robin order; prompts in `exclude` are skipped.
    `split`: only problems of that split (see `split_of`); None: any. `distinct=False` draws with repetition
    (a training set larger than its split's problem space; still no problem of another split)."""
    check_task(kinds, digits)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    rng = random.Random(seed)

    def draw(i: int) -> dict | None:
        example = make_example(rng, kinds[i % len(kinds)], digits)
        return example if split is None or example["split"] == split else None

    what = f"examples of kinds {list(kinds)} with {digits} digits" + (f" in the {split} split" if split else "")
    return _draw(n, what, draw, set(exclude or ()), key=(lambda e: e["prompt"]) if distinct else None)


def make_dialogues(n: int, seed: int, exclude: set[str] | None = None, *, digits: int = 2,
                   split: str | None = None) -> list[dict]:
    """2-turn dialogues `{"messages": [...], "answer"}`: a sum, then a follow-up on its result. `split` keeps
    dialogues whose follow-up problem (result, op, amount) hashes to that split."""
    rng = random.Random(seed)
    top = max(10**digits // 2, 5)

    def draw(_: int) -> dict | None:
        a, b, c = rng.randint(0, top), rng.randint(0, top), rng.randint(1, max(top // 2, 2))
        follow, op, amount = rng.choice(((f"Now add {c} to that.", "+", c),
                                         (f"Now take away {min(c, a + b)} from that.", "-", min(c, a + b))))
        if split is not None and split_of(op, a + b, amount) != split:
            return None
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": follow}, {"role": "assistant", "content": str(_apply(op, a + b, amount))},
        ]
        return {"messages": messages, "answer": messages[-1]["content"], "kind": "dialogue"}

    return _draw(n, f"dialogues with {digits} digits", draw, set(exclude or ()), key=dialogue_key)


def dialogue_key(dialogue: dict) -> str:
    return dialogue["messages"][0]["content"] + " / " + dialogue["messages"][2]["content"]


def make_splits(n_train: int, n_valid: int, n_test: int, seed: int = 0, dialogue_fraction: float = 0.0, *,
                kinds: Sequence[str] = SHIPPED_KINDS, digits: int = SHIPPED_DIGITS, repeat_train: bool = False) -> dict:
    """Train/valid/test lists whose problems never meet (each split draws only its own problems).
    `repeat_train`: the train split may repeat problems (as many examples as a long run needs)."""
    if not 0 <= dialogue_fraction <= 1:
        raise ValueError(f"dialogue_fraction must be in [0, 1], got {dialogue_fraction}")
    splits = {}
    for i, (name, n) in enumerate(zip(SPLITS, (n_train, n_valid, n_test))):
        n_dialogue = int(round(n * dialogue_fraction))
        singles = make_arithmetic_examples(n - n_dialogue, seed * 1000 + i, kinds, digits=digits, split=name,
                                           distinct=not (repeat_train and name == "train"))
        dialogues = make_dialogues(n_dialogue, seed * 1000 + 100 + i, digits=digits, split=name)
        merged = singles + dialogues
        random.Random(seed * 1000 + 200 + i).shuffle(merged)
        splits[name] = merged
    return splits


def multiple_choice(answer: str, n_choices: int, seed: str) -> tuple[list[str], int]:
    """The correct result among `n_choices - 1` near misses (choices, index of the correct one): off by 1, 2,
    10 or 20 (a slipped digit or carry) with as many digits as the answer where possible, never negative. The
    distractors and the answer's position are a function of (answer, seed)."""
    rng = random.Random(f"{seed}:{answer}")
    value = int(answer)
    near = [value + d for d in (1, -1, 2, -2, 10, -10, 20, -20, 100, -100, 3, -3)]
    same_length = [v for v in near if v >= 0 and len(str(v)) == len(answer)]
    others = [v for v in near if v >= 0 and v not in same_length]
    rng.shuffle(same_length)
    rng.shuffle(others)
    pool = (same_length + others)[: n_choices - 1]
    if len(pool) < n_choices - 1:
        raise ValueError(f"cannot find {n_choices - 1} distractors for {answer}")
    gold = rng.randrange(n_choices)
    choices = [str(v) for v in pool]
    choices.insert(gold, answer)
    return choices, gold


def to_record(example: dict) -> dict:
    """The jsonl record: prompt/response (or messages) and kind; `answer` equals the response, so it is not stored."""
    if "messages" in example:
        return {"messages": example["messages"], "kind": example["kind"]}
    return {"prompt": example["prompt"], "response": example["response"], "kind": example["kind"]}


def write_splits(out_dir: str | Path, n_train: int = 2000, n_valid: int = 200, n_test: int = 200,
                 seed: int = 0, dialogue_fraction: float = 0.0, *, kinds: Sequence[str] = SHIPPED_KINDS,
                 digits: int = SHIPPED_DIGITS, repeat_train: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = make_splits(n_train, n_valid, n_test, seed, dialogue_fraction, kinds=kinds, digits=digits,
                         repeat_train=repeat_train)
    for name, examples in splits.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(to_record(example), separators=(",", ":")) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/instruct")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-valid", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(SHIPPED_KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--digits", type=int, default=SHIPPED_DIGITS, help="digits of every number")
    parser.add_argument("--repeat-train", action="store_true",
                        help="the train split may repeat problems (more examples than its problem space)")
    parser.add_argument("--dialogue-fraction", type=float, default=0.0, help="share of 2-turn dialogues")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    try:
        paths = write_splits(args.out, args.n_train, args.n_valid, args.n_test, args.seed, args.dialogue_fraction,
                             kinds=kinds, digits=args.digits, repeat_train=args.repeat_train)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
