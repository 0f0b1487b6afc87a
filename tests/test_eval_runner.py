"""The runner with scripted fake scorers/generators: accuracy, standard errors, limit, per-example outputs, resume."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from illada_lightning.diffusion.sampler_config import SamplerConfig
from illada_lightning.diffusion.scoring import ScoringConfig
from illada_lightning.evaluation import EvalConfig, evaluate
from tests.test_eval_tasks import ARC_LETTERS, ARC_NUMERIC, GSM8K_TEST, write_jsonl


class CharTokenizer:
    """One id per character (offset past the special ids); enough for the runner, which only moves ids."""

    OFFSET = 16

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + self.OFFSET for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - self.OFFSET) for i in ids if i >= self.OFFSET)

    def format_chat(self, messages, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeModel(torch.nn.Module):
    """Has what the runner reads: `config.max_seq_len` and a training flag."""

    def __init__(self, max_seq_len=4096):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)


class PickChoice:
    """A scorer that always prefers candidate `choice` (when it exists), recording what it was asked."""

    def __init__(self, choice):
        self.choice, self.calls = choice, []

    def __call__(self, items):
        self.calls.append(items)
        return [[1.0 if i == self.choice else 0.0 for i in range(len(cands))] for _, cands in items]


def arc_file(tmp_path, n=10):
    """n ARC items: golds alternate B (index 1) and 4 (index 3)."""
    return write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [ARC_LETTERS if i % 2 == 0 else ARC_NUMERIC
                                                               for i in range(n)])


def arc_cfg(path, **kw):
    return EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": str(path)}, **kw)


def test_fake_model_that_always_picks_a_known_choice(tmp_path):
    path = arc_file(tmp_path, n=10)  # 5 golds at index 1, 5 at index 3
    for choice, expected in ((1, 0.5), (3, 0.5), (0, 0.0)):
        results = evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, batch_size=3), scorer=PickChoice(choice))
        metrics = results["arc_challenge"]
        assert metrics["acc"] == expected and metrics["n"] == 10
        assert metrics["acc_stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / 10))
    scorer = PickChoice(1)
    evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, batch_size=4, limit=7), scorer=scorer)
    assert [len(c) for c in scorer.calls] == [4, 3]  # limit=7 in batches of 4
    context, candidates = scorer.calls[0][0]
    assert CharTokenizer().decode(context).endswith("Earth?\nAnswer:")
    assert CharTokenizer().decode(candidates[1]) == " the Sun"


def test_acc_norm_divides_by_continuation_length(tmp_path):
    path = arc_file(tmp_path, n=1)  # " the Moon" (9 bytes), " the Sun" (8), " wind" (5); gold: " the Sun"
    scores = {" the Moon": -4.5, " the Sun": -2.4, " wind": -2.0}  # per byte: -0.5, -0.3, -0.4
    tok = CharTokenizer()

    def scorer(items):
        return [[scores[tok.decode(c)] for c in cands] for _, cands in items]

    metrics = evaluate(FakeModel(), tok, None, arc_cfg(path), scorer=scorer)["arc_challenge"]
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0  # raw prefers the short " wind"


def test_per_example_outputs_are_written(tmp_path):
    path = arc_file(tmp_path, n=4)
    evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path), scorer=PickChoice(1), out_dir=tmp_path / "out")
    lines = (tmp_path / "out" / "arc_challenge.examples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4
    first = records[0]
    assert set(first) >= {"prompt", "candidates", "scores", "prediction", "target", "correct"}
    assert first["candidates"] == [" the Moon", " the Sun", " wind"] and first["prediction"] == 1
    assert first["target"] == 1 and first["correct"] is True and first["where"].endswith(":1")
    assert records[1]["correct"] is False and records[1]["target"] == 3


class Interrupt(Exception):
    pass


def test_resume_from_per_example_outputs(tmp_path):
    path = arc_file(tmp_path, n=10)
    out = tmp_path / "out"
    reference = evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, batch_size=4), scorer=PickChoice(3))

    calls = []

    def dies_on_second_batch(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise Interrupt
        return PickChoice(3)(items)

    with pytest.raises(Interrupt):
        evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, batch_size=4), scorer=dies_on_second_batch,
                 out_dir=out)
    file = out / "arc_challenge.examples.jsonl"
    assert len(file.read_text().splitlines()) == 4
    with open(file, "a") as f:  # the interruption also cut a write short
        f.write('{"doc_id": "4", "prom')

    scorer = PickChoice(3)
    resumed = evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, batch_size=4), scorer=scorer, out_dir=out)
    assert sum(len(c) for c in scorer.calls) == 6  # only the 6 examples not yet written
    assert {k: v for k, v in resumed["arc_challenge"].items() if k != "seconds"} == \
        {k: v for k, v in reference["arc_challenge"].items() if k != "seconds"}
    assert len(file.read_text().splitlines()) == 10

    with pytest.raises(ValueError, match="different settings.*scoring_rule"):
        evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, scoring=ScoringConfig(rule="likelihood")), scorer=scorer,
                 out_dir=out)


def test_long_contexts_are_cut_from_the_left(tmp_path):
    path = arc_file(tmp_path, n=1)
    scorer = PickChoice(1)
    evaluate(FakeModel(max_seq_len=20), CharTokenizer(), None, arc_cfg(path), scorer=scorer)
    context, candidates = scorer.calls[0][0]
    assert len(context) + max(map(len, candidates)) == 20
    assert CharTokenizer().decode(context).endswith("\nAnswer:")


def test_subset_is_fixed_for_a_seed_and_sharding_partitions_it(tmp_path):
    path = arc_file(tmp_path, n=10)
    seen = {}
    for rank in (0, 1):
        scorer = PickChoice(1)
        evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path), scorer=scorer, subset_size=6, rank=rank,
                 world_size=2)
        seen[rank] = [tuple(ctx) for batch in scorer.calls for ctx, _ in batch]
    assert len(seen[0]) == 3 and len(seen[1]) == 3


def scripted_generator(answers_by_question):
    """Answers each GSM8K prompt with the scripted text for the question it ends with."""
    tok = CharTokenizer()

    def generate(prompts, stop_strings=()):
        assert stop_strings == ("Question:",)
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            question = next(q for q in answers_by_question if text.endswith(f"Question: {q}\nAnswer:"))
            out.append(tok.encode(answers_by_question[question]))
        return out

    return generate


def test_generation_task_exact_match(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_TEST)
    cfg = EvalConfig(tasks=["gsm8k"], data={"gsm8k": str(path)}, num_fewshot=0,
                     sampler=SamplerConfig(gen_length=32, block_length=32, steps=32))
    generator = scripted_generator({GSM8K_TEST[0]["question"]: " 1000 - 250 = 750. The answer is 750 ducks.",
                                    GSM8K_TEST[1]["question"]: " 2 + 1 = 3 bolts.\n#### 4"})
    results = evaluate(FakeModel(), CharTokenizer(), None, cfg, generator=generator, out_dir=tmp_path / "out")
    assert results["gsm8k"]["exact_match"] == 0.5 and results["gsm8k"]["n"] == 2
    assert results["gsm8k"]["exact_match_stderr"] == pytest.approx(0.5 / math.sqrt(2))
    records = [json.loads(x) for x in (tmp_path / "out" / "gsm8k.examples.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["target"], r["correct"]) for r in records] == [("750", "750", True),
                                                                              ("4", "3", False)]


def test_generation_budget_must_leave_room_for_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_TEST)
    cfg = EvalConfig(tasks=["gsm8k"], data={"gsm8k": str(path)}, num_fewshot=0,
                     sampler=SamplerConfig(gen_length=64, block_length=32, steps=64))
    with pytest.raises(ValueError, match="leaves no room for a prompt in max_seq_len=64"):
        evaluate(FakeModel(max_seq_len=64), CharTokenizer(), None, cfg, generator=lambda p, stop_strings=(): [])


def test_model_training_mode_is_restored(tmp_path):
    model = FakeModel()
    model.train()
    seen = []

    def scorer(items):
        seen.append((model.training, torch.is_grad_enabled()))
        return PickChoice(1)(items)

    evaluate(model, CharTokenizer(), None, arc_cfg(arc_file(tmp_path, n=2)), scorer=scorer)
    assert seen == [(False, False)] and model.training
