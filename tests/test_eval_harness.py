"""The lm-evaluation-harness adapter (optional extra `harness`), offline, with a local task definition."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from illada_lightning.evaluation.harness import IlladaLM  # noqa: E402  (registers the "illada" model)
from tests.test_eval_cli import tiny  # noqa: E402,F401  (module-scoped fixture: a tiny random model)
from tests.test_eval_tasks import ARC_LETTERS, ARC_NUMERIC, GSM8K_TEST, write_jsonl  # noqa: E402

# One local multiple-choice task for the harness; {name} and {data} are filled in per test.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.mark.parametrize("rule", ["confidence", "likelihood"])
def test_harness_runs_a_local_multiple_choice_task(tmp_path, tiny, rule):  # noqa: F811
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "What heats the water?", "choices": ["the Sun", "the Moon", "a duck"], "label": 0},
        {"question": "Who sells ducks?", "choices": ["Janet", "the air"], "label": 0},
    ]))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(name="illada_local_mc", data=data))
    lm = IlladaLM(model=model, tokenizer=tokenizer, scoring_rule=rule, mc_samples=4, mc_batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["illada_local_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  log_samples=True)
    metrics = out["results"]["illada_local_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_stderr,none" in metrics
    samples = out["samples"]["illada_local_mc"]
    assert len(samples) == 2 and all(len(s["resps"]) in (2, 3) for s in samples)


def test_harness_generate_until_stops_at_the_stop_strings(tiny):  # noqa: F811
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny
    lm = IlladaLM(model=model, tokenizer=tokenizer, block_length=8)
    request = Instance("generate_until", {}, ("Question: 2 + 2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 5}), 0)
    (answer,) = lm.generate_until([request])
    assert isinstance(answer, str) and "\n" not in answer
    assert len(tokenizer.encode(answer)) <= 8  # max_gen_toks rounded up to one block


# ----------------------------------------------------------------------------- same numbers as experiments.evaluate

ARC_ITEMS = [ARC_LETTERS, ARC_NUMERIC, {**ARC_LETTERS, "id": "x3", "answerKey": "C"}]
HARNESS_GEN_YAML = """\
task: illada_gsm8k_same_items
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def _flat_arc(record: dict) -> dict:
    """The same ARC item in the flat shape the harness task reads."""
    choices = record["question"]["choices"]
    return {"question": record["question"]["stem"], "choices": [c["text"] for c in choices],
            "label": [c["label"] for c in choices].index(record["answerKey"])}


def _evaluate(tmp_path, model, tokenizer, task: str, data, **options):
    from illada_lightning.diffusion.sampler_config import SamplerConfig
    from illada_lightning.diffusion.scoring_config import ScoringConfig
    from illada_lightning.evaluation import EvalConfig, evaluate

    groups = {"scoring": ScoringConfig(**options.pop("scoring", {})), "sampler": SamplerConfig(**options.pop("sampler", {}))}
    cfg = EvalConfig(tasks=[task], data={task: str(data)}, num_fewshot=0, batch_size=16, **groups, **options)
    out = tmp_path / f"ours-{task}-{groups['scoring'].rule}"
    results = evaluate(model, tokenizer, None, cfg, out_dir=out)
    records = [json.loads(x) for x in (out / f"{task}.examples.jsonl").read_text().splitlines()]
    return results[task], records


@pytest.mark.parametrize("rule", ["confidence", "likelihood"])
def test_harness_multiple_choice_matches_experiments_evaluate(tmp_path, tiny, rule):  # noqa: F811
    """Same items, same prompts and continuations, same seed: the harness's acc and per-choice scores equal
    experiments.evaluate's (for the likelihood rule too: one scorer call each, so the same Monte-Carlo masks)."""
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    arc = write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", ARC_ITEMS)
    ours, records = _evaluate(tmp_path, model, tokenizer, "arc_challenge", arc, scoring=dict(rule=rule, mc_samples=4,
                                                                                       mc_batch_size=4))
    flat = write_jsonl(tmp_path / "flat.jsonl", [_flat_arc(r) for r in ARC_ITEMS])
    (tmp_path / "mc.yaml").write_text(TASK_YAML.format(name="illada_arc_same_items", data=flat))
    lm = IlladaLM(model=model, tokenizer=tokenizer, scoring_rule=rule, mc_samples=4, mc_batch_size=4, batch_size=64)
    out = lm_eval.simple_evaluate(model=lm, tasks=["illada_arc_same_items"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    samples = sorted(out["samples"]["illada_arc_same_items"], key=lambda s: s["doc_id"])
    harness_scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    ours_scores = [r["scores"] for r in records]
    assert [len(h) for h in harness_scores] == [len(o) for o in ours_scores] == [3, 5, 3]
    assert all(h == pytest.approx(o, abs=1e-9) for h, o in zip(harness_scores, ours_scores))
    assert out["results"]["illada_arc_same_items"]["acc,none"] == pytest.approx(ours["acc"])


def test_harness_generation_matches_experiments_evaluate(tmp_path, tiny):  # noqa: F811
    from lm_eval.tasks import TaskManager

    from illada_lightning import build_model

    _, tokenizer = tiny
    # A random model whose every output id is a text token (zero rows: the special ids never win the argmax),
    # so the two generations compared are non-empty text.
    model = build_model("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128,
                        vocab_size=tokenizer.vocab_size, max_seq_len=128).eval()
    with torch.no_grad():
        model.embed.weight[:9] = 0.0
    gsm = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_TEST)
    ours, records = _evaluate(tmp_path, model, tokenizer, "gsm8k", gsm,
                              sampler=dict(gen_length=8, steps=8, block_length=8))
    (tmp_path / "gen.yaml").write_text(HARNESS_GEN_YAML.format(data=gsm))
    lm = IlladaLM(model=model, tokenizer=tokenizer, block_length=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["illada_gsm8k_same_items"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    samples = sorted(out["samples"]["illada_gsm8k_same_items"], key=lambda s: s["doc_id"])
    answers = [s["resps"][0][0] for s in samples]
    assert answers == [r["output"].split("Question:")[0] for r in records] and any(a.strip() for a in answers)
    assert out["results"]["illada_gsm8k_same_items"]["exact_match,none"] == pytest.approx(ours["exact_match"])


def test_harness_loads_a_released_format_checkpoint_directory(tmp_path, tiny):  # noqa: F811
    from lm_eval.api.instance import Instance

    from illada_lightning.interop.llada_hf import export_hf_checkpoint

    model, tokenizer = tiny
    export_hf_checkpoint(model, tokenizer, tmp_path / "hf", dtype="float32")
    request = Instance("loglikelihood", {}, ("Question: What heats the water?\nAnswer:", " the Sun"), 0)
    from_dir = IlladaLM(ckpt=str(tmp_path / "hf"), device="cpu").loglikelihood([request])
    assert from_dir == IlladaLM(model=model, tokenizer=tokenizer).loglikelihood([request])
