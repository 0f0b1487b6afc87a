"""The synthetic instruction task and the data shipped in the repository."""

import json
import re
from pathlib import Path

import pytest

from illada_lightning.data.synthetic import (
    make_arithmetic_examples,
    make_dialogues,
    make_splits,
    multiple_choice,
    split_of,
    to_record,
    write_splits,
)

REPO = Path(__file__).resolve().parents[1]


def problem(example):
    """(op, operands) of a single-turn example, read from its wording alone, as the split hash sees it."""
    p = example["prompt"]
    numbers = [int(x) for x in re.findall(r"\d+", p)]
    if p.startswith("Repeat "):
        return "=", numbers[0], 0
    if p.startswith("What number comes after"):
        return "+", numbers[0], 1
    a, b = numbers
    op = "max" if "larger" in p else "*" if "*" in p or "bags" in p else "-" if re.search(r" - |gives|lost", p) else "+"
    return (op, a, b) if op == "-" else (op, min(a, b), max(a, b))


def check_answer(example):
    """Recompute the answer from the prompt text alone."""
    op, a, b = problem(example)
    return str({"=": a, "+": a + b, "-": a - b, "*": a * b, "max": max(a, b)}[op])


def test_examples_are_seeded_distinct_and_correct():
    kinds = ("add", "sub", "mul", "word", "copy", "next", "max")
    ex = make_arithmetic_examples(420, seed=3, kinds=kinds, digits=2)
    assert ex == make_arithmetic_examples(420, seed=3, kinds=kinds, digits=2)
    assert ex != make_arithmetic_examples(420, seed=4, kinds=kinds, digits=2)
    assert len({e["prompt"] for e in ex}) == 420
    assert {e["kind"] for e in ex} == set(kinds)
    for e in ex:
        assert e["response"] == e["answer"] == check_answer(e)
        assert int(e["answer"]) >= 0
    only_add = make_arithmetic_examples(20, seed=0, kinds=("add",))
    assert all(e["kind"] == "add" and " + " in e["prompt"] for e in only_add)
    with pytest.raises(ValueError, match="unknown kind 'div'"):
        make_arithmetic_examples(3, 0, kinds=("div",))


def test_dialogues_are_two_turn_and_consistent():
    for d in make_dialogues(50, seed=1):
        user1, a1, user2, a2 = d["messages"]
        assert [m["role"] for m in d["messages"]] == ["user", "assistant", "user", "assistant"]
        x, y = (int(v) for v in re.findall(r"\d+", user1["content"]))
        assert a1["content"] == str(x + y)
        c = int(re.findall(r"\d+", user2["content"])[0])
        assert a2["content"] == d["answer"] == str(x + y + c if "add" in user2["content"] else x + y - c)


def test_splits_are_disjoint():
    splits = make_splits(300, 60, 60, seed=0)
    prompts = {k: {e.get("prompt") or json.dumps(e["messages"]) for e in v} for k, v in splits.items()}
    assert prompts["train"].isdisjoint(prompts["valid"]) and prompts["train"].isdisjoint(prompts["test"])
    assert prompts["valid"].isdisjoint(prompts["test"])
    assert [len(v) for v in splits.values()] == [300, 60, 60]


def test_held_out_problems_never_meet_training_at_any_size_or_seed():
    """The split is a function of the problem (3 + 5 and 5 + 3 are one), not of the draw: a large training
    set from another seed still shares no problem, in any wording, with the test split."""
    kinds = ("copy", "next", "max", "add", "sub", "word")
    test = make_splits(0, 0, 200, seed=0, kinds=kinds)["test"]
    train = make_splits(20000, 0, 0, seed=99, kinds=kinds, repeat_train=True)["train"]
    assert len({e["prompt"] for e in train}) < 20000  # repeats: more examples than the copy/next problems
    held_out = {problem(e) for e in test}
    assert held_out.isdisjoint(problem(e) for e in train)
    assert all(split_of(*problem(e)) == "test" for e in test)
    assert split_of("+", 3, 5) == split_of("+", 5, 3) and split_of("max", 3, 5) == split_of("max", 5, 3)
    shares = [sum(split_of("+", a, b) == s for a in range(100) for b in range(a, 100)) / 5050
              for s in ("test", "valid")]
    assert all(0.07 < share < 0.13 for share in shares), shares  # HOLDOUT = 10 % each


def test_difficulty_by_digits_and_kind():
    for digits in (1, 2, 3):
        for e in make_arithmetic_examples(40, seed=digits, kinds=("add", "sub"), digits=digits):
            a, b = (int(x) for x in re.findall(r"\d+", e["prompt"]))
            assert len(str(a)) == len(str(b)) == digits, e  # fixed width: every operand has `digits` digits
            assert e["answer"] == check_answer(e)
    assert all(e["kind"] == "mul" for e in make_arithmetic_examples(10, seed=0, kinds=("mul",), digits=3))
    with pytest.raises(ValueError, match="too small"):
        make_arithmetic_examples(200, seed=0, kinds=("add",), digits=1, split="test")  # 10 % of 55 sums
    with pytest.raises(ValueError, match="digits must be in 1..9"):
        make_arithmetic_examples(1, seed=0, digits=0)


def test_multiple_choice_holds_the_answer_among_near_misses():
    for answer in ("0", "7", "42", "140", "1998"):
        choices, gold = multiple_choice(answer, 4, seed="s")
        assert choices[gold] == answer and len(set(choices)) == 4
        assert all(int(c) >= 0 and abs(int(c) - int(answer)) <= 100 for c in choices)
        assert (choices, gold) == multiple_choice(answer, 4, seed="s")
    golds = {multiple_choice(str(v), 4, seed="s")[1] for v in range(100, 200)}
    assert golds == {0, 1, 2, 3}  # the answer's position is not a give-away
    same_length = sum(len(c) == 2 for v in range(10, 90) for c in multiple_choice(str(v), 4, "s")[0])
    assert same_length == 4 * 80  # two-digit answers get two-digit distractors


def test_write_splits_matches_the_shipped_files(tmp_path):
    paths = write_splits(tmp_path)  # the command in data/instruct/README.md: the defaults
    for name, path in paths.items():
        assert path.read_bytes() == (REPO / "data" / "instruct" / f"{name}.jsonl").read_bytes(), name


def test_shipped_records_are_valid():
    lines = (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert 2000 <= len(records) <= 4000
    for r in records[:500]:
        if "messages" in r:
            assert r["messages"][-1]["role"] == "assistant"
        else:
            assert r["response"] == check_answer(r)
    assert to_record({"prompt": "p", "response": "r", "answer": "r", "kind": "add"}) == {
        "prompt": "p", "response": "r", "kind": "add"}


def test_shipped_data_is_small():
    total = sum(p.stat().st_size for p in (REPO / "data").rglob("*") if p.is_file())
    assert total < 1_000_000
    assert (REPO / "data" / "corpus" / "train.txt").stat().st_size > 200_000
