"""The lm-evaluation-harness adapter (optional extra `harness`), offline, with a local task definition."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from illada_lightning.evaluation.harness import IlladaLM  # noqa: E402  (registers the "illada" model)
from tests.test_eval_cli import tiny  # noqa: E402,F401  (module-scoped fixture: a tiny random model)

TASK_YAML = """\
task: illada_local_mc
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
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    lm = IlladaLM(model=model, tokenizer=tokenizer, scoring_rule=rule, mc_samples=4, mc_batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["illada_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
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
