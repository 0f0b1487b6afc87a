"""The synthetic instruction task and the data shipped in the repository."""

import json
import re
from pathlib import Path

import pytest

from illada_lightning.data.synthetic import (
    make_arithmetic_examples,
    make_dialogues,
    make_splits,
    to_record,
    write_splits,
)

REPO = Path(__file__).resolve().parents[1]


def check_answer(example):
    """Recompute the answer from the prompt text alone."""
    p = example["prompt"]
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p):
        a, op, b = int(m[1]), m[2], int(m[3])
    else:
        a, b = (int(x) for x in re.findall(r"\d+", p))
        op = "*" if "bags" in p else "-" if re.search(r"gives|lost", p) else "+"
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def test_examples_are_seeded_distinct_and_correct():
    ex = make_arithmetic_examples(400, seed=3)
    assert ex == make_arithmetic_examples(400, seed=3)
    assert ex != make_arithmetic_examples(400, seed=4)
    assert len({e["prompt"] for e in ex}) == 400
    assert {e["kind"] for e in ex} == {"add", "sub", "mul", "word"}
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


def test_write_splits_matches_the_shipped_files(tmp_path):
    paths = write_splits(tmp_path, 2500, 250, 250, seed=0)  # the command in data/instruct/README.md
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
