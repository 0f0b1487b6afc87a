"""The generated tasks: the corpus cloze task and the synthetic instruction task (deterministic, correct answers)."""

import json
import re

import pytest

from illada_lightning.data.synthetic import write_splits
from illada_lightning.diffusion.sampler_config import SamplerConfig
from illada_lightning.evaluation import EvalConfig, evaluate, get_task
from illada_lightning.evaluation.cloze import make_cloze_examples
from illada_lightning.evaluation.records import EvalDataError
from tests.test_eval_runner import CharTokenizer, FakeModel


def corpus(n_docs=6, words=40):
    """WikiText-style articles whose words name their document and position: w<doc>_<i>."""
    parts = []
    for d in range(n_docs):
        parts.append(f" = Article {d} = \n \n " + " ".join(f"w{d}_{i}" for i in range(words)) + " \n \n")
    return "".join(parts)


def cloze(text, seed=0, **kw):
    opts = dict(n_items=30, n_choices=4, context_words=10, continuation_words=5, seed=seed)
    return make_cloze_examples(text, **{**opts, **kw})


def test_cloze_is_deterministic_for_a_seed():
    text = corpus()
    a, b, c = cloze(text, seed=3), cloze(text, seed=3), cloze(text, seed=4)
    assert [(e.context, e.continuations, e.gold) for e in a] == [(e.context, e.continuations, e.gold) for e in b]
    assert [(e.context, e.continuations) for e in a] != [(e.context, e.continuations) for e in c]


def test_cloze_gold_continues_the_context_and_distractors_come_from_other_documents():
    examples = cloze(corpus())
    golds = set()
    for ex in examples:
        words = ex.context.split()
        assert len(words) == 10
        doc, last = re.fullmatch(r"w(\d+)_(\d+)", words[-1]).groups()
        truth = " " + " ".join(f"w{doc}_{int(last) + k}" for k in range(1, 6))
        assert ex.continuations[ex.gold] == truth
        assert len(ex.continuations) == 4 and len(set(ex.continuations)) == 4
        for i, cont in enumerate(ex.continuations):
            if i != ex.gold:
                assert all(not w.startswith(f"w{doc}_") for w in cont.split())
        golds.add(ex.gold)
    assert golds == {0, 1, 2, 3}  # the gold position is shuffled


def test_cloze_headings_are_not_running_text():
    assert all("=" not in ex.context for ex in cloze(corpus()))


def test_cloze_corpus_too_small():
    with pytest.raises(EvalDataError, match="need at least 2 documents"):
        cloze(" = A = \n \n only a few words here \n")


def test_cloze_task_through_the_registry(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text(corpus())
    cfg = EvalConfig(tasks=["cloze"], data={"cloze": str(path)}, cloze_items=12, cloze_context_words=10,
                     cloze_continuation_words=5, seed=7)
    examples = get_task("cloze").examples(cfg)
    assert len(examples) == 12 and examples[0].where.startswith(str(path))

    def oracle(items):  # prefers the candidate that continues the context's word numbering
        tok = CharTokenizer()
        out = []
        for ctx, cands in items:
            last = tok.decode(ctx).split()[-1]
            doc, i = re.fullmatch(r"w(\d+)_(\d+)", last).groups()
            nxt = f" w{doc}_{int(i) + 1} "
            out.append([1.0 if tok.decode(c).startswith(nxt) else 0.0 for c in cands])
        return out

    assert evaluate(FakeModel(), CharTokenizer(), None, cfg, scorer=oracle)["cloze"]["acc"] == 1.0


def test_synthetic_task_splits_are_deterministic_and_answers_correct(tmp_path):
    kinds = ("add", "sub", "mul", "copy", "next", "max")
    paths_a = write_splits(tmp_path / "a", n_train=40, n_valid=5, n_test=30, seed=5, kinds=kinds, digits=2)
    paths_b = write_splits(tmp_path / "b", n_train=40, n_valid=5, n_test=30, seed=5, kinds=kinds, digits=2)
    assert paths_a["test"].read_text() == paths_b["test"].read_text()
    train_prompts = {json.loads(x).get("prompt") for x in paths_a["train"].read_text().splitlines()}

    cfg = EvalConfig(tasks=["synthetic"], data={"synthetic": str(paths_a["test"])})
    examples = get_task("synthetic").examples(cfg)
    assert len(examples) == 30
    for ex in examples:
        assert ex.messages[-1]["role"] == "user"
        assert ex.messages[0]["content"] not in train_prompts or len(ex.messages) > 1  # disjoint from SFT data
        match = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", ex.messages[-1]["content"])
        if match:  # arithmetic items: the reference is the true value
            a, op, b = match.groups()
            assert int(ex.target) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_synthetic_choice_holds_the_answer_among_near_misses_and_scores_after_the_chat_prompt(tmp_path):
    paths = write_splits(tmp_path, n_train=10, n_valid=2, n_test=12, seed=2)
    cfg = EvalConfig(tasks=["synthetic_choice"], data={"synthetic_choice": str(paths["test"])})
    examples = get_task("synthetic_choice").examples(cfg)
    targets = [ex.target for ex in get_task("synthetic").examples(EvalConfig(data={"synthetic": str(paths["test"])}))]
    assert len(examples) == 12 and [ex.continuations[ex.gold] for ex in examples] == targets
    assert all(len(set(ex.continuations)) == 4 for ex in examples)
    tok = CharTokenizer()
    chat_contexts = {tok.format_chat(ex.messages, add_generation_prompt=True): ex.continuations[ex.gold]
                     for ex in examples}

    def scorer(items):  # prefers the right answer only when the context is the chat-formatted question
        return [[1.0 if chat_contexts.get(tok.decode(ctx)) == tok.decode(c) else 0.0 for c in cands]
                for ctx, cands in items]

    results = evaluate(FakeModel(), tok, None, cfg, scorer=scorer)
    assert results["synthetic_choice"]["acc"] == 1.0 and results["synthetic_choice"]["n"] == 12


def test_synthetic_task_exact_match_through_the_chat_template(tmp_path):
    paths = write_splits(tmp_path, n_train=10, n_valid=2, n_test=8, seed=1)
    cfg = EvalConfig(tasks=["synthetic"], data={"synthetic": str(paths["test"])}, sampler=SamplerConfig(gen_length=8, block_length=8, steps=8))
    examples = get_task("synthetic").examples(cfg)
    tok = CharTokenizer()
    answers = {}
    for ex in examples:
        answers[tok.format_chat(ex.messages, add_generation_prompt=True)] = ex.target

    def generator(prompts, stop_strings=()):
        assert stop_strings == ()  # chat prompts: EOS ends the answer
        return [tok.encode(answers[tok.decode(p)]) for p in prompts]

    results = evaluate(FakeModel(), tok, None, cfg, generator=generator)
    assert results["synthetic"]["exact_match"] == 1.0 and results["synthetic"]["n"] == 8
