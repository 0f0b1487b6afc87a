"""End to end with a real tiny random model: the real scorer (both rules) and sampler, and the CLI
(`python -m experiments.evaluate`) writing results.json and logging to the training run in MLflow."""

import json
from dataclasses import asdict

import pytest
import torch

from illada_lightning import build_model
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.diffusion.sampler_config import SamplerConfig
from illada_lightning.diffusion.scoring import ScoringConfig
from illada_lightning.evaluation import EvalConfig, evaluate
from illada_lightning.evaluation.cli import find_training_run, format_table, main
from tests.test_eval_tasks import ARC_LETTERS, ARC_NUMERIC, GSM8K_TEST, write_jsonl

TEXT = ("Which process moves water from the ground into the air? The Sun heats water and it evaporates. "
        "Janet has ducks and sells some of them at the market every day. ") * 20


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = train_tokenizer_from_iterator([TEXT], 320)
    model = build_model("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=512,
                        max_seq_len=128)
    return model.eval(), tokenizer


def fixtures(tmp_path):
    return {"arc_challenge": str(write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [ARC_LETTERS, ARC_NUMERIC])),
            "gsm8k": str(write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_TEST))}


@pytest.mark.parametrize("rule", ["confidence", "likelihood"])
def test_real_tiny_model_through_scorer_and_sampler(tmp_path, tiny, rule):
    model, tokenizer = tiny
    cfg = EvalConfig(tasks=["arc_challenge", "gsm8k"], data=fixtures(tmp_path), num_fewshot=0,
                     scoring=ScoringConfig(rule=rule, mc_samples=4, mc_batch_size=4),
                     sampler=SamplerConfig(gen_length=8, block_length=8, steps=8))
    results = evaluate(model, tokenizer, None, cfg, out_dir=tmp_path / "out")
    assert results["arc_challenge"]["n"] == 2 and results["gsm8k"]["n"] == 2
    records = [json.loads(x) for x in (tmp_path / "out" / "arc_challenge.examples.jsonl").read_text().splitlines()]
    assert [len(r["scores"]) for r in records] == [3, 5]
    assert all(s < 0 for r in records for s in r["scores"])  # sums of log-probabilities
    again = evaluate(model, tokenizer, None, cfg)  # deterministic for a seed (likelihood: seeded masks)
    assert again["arc_challenge"]["acc"] == results["arc_challenge"]["acc"]
    assert [json.loads(x)["scores"] for x in (tmp_path / "out" / "arc_challenge.examples.jsonl").read_text()
            .splitlines()] == [r["scores"] for r in records]


def test_cli_writes_results_and_logs_a_run_nested_under_the_training_run(tmp_path, tiny, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from illada_lightning.checkpoint import export_model

    model, tokenizer = tiny
    run_dir = tmp_path / "runs" / "exp"
    ckpt = export_model(run_dir / "sft" / "model.pt", model.config, model.state_dict(), tokenizer.backend.to_str())
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("illada-lightning")
    sft_run = client.create_run(experiment).info.run_id
    (run_dir / "mlflow_runs.json").write_text(json.dumps({"parent": "p", "sft": sft_run}))
    (run_dir / "config.yaml").write_text(f"runs_root: {tmp_path / 'runs'}\nmlflow:\n  tracking_uri: null\n")
    assert find_training_run(ckpt) == (sft_run, store)

    data = fixtures(tmp_path)
    argv = [f"ckpt={ckpt}", "tasks=[arc_challenge]", "scoring.rule=confidence", "limit=1", "scoring.cache=context",
            "sampler.cache=dual", "sampler.parallel=threshold", f"data.arc_challenge={data['arc_challenge']}"]
    try:
        assert main(argv) == 0
    finally:
        mlflow.set_tracking_uri("")  # the CLI points MLflow at the training store; leave no global state
    results = json.loads((run_dir / "sft" / "eval" / "results.json").read_text())
    assert set(results) == {"arc_challenge"} and results["arc_challenge"]["n"] == 1
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(results["arc_challenge"])
    out = capsys.readouterr().out
    assert "arc_challenge" in out and "± stderr" in out
    (eval_run,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sft_run}'")
    assert eval_run.data.metrics["eval/arc_challenge/acc"] == results["arc_challenge"]["acc"]
    assert eval_run.data.tags["illada.checkpoint"] == str(ckpt.resolve())
    assert len(eval_run.data.tags["mlflow.source.git.commit"]) == 40  # the evaluated code is cited in reports
    assert eval_run.data.params["scoring.rule"] == "confidence" and eval_run.data.params["limit"] == "1"
    # The fast-decoding options are recorded with the run (issue 17).
    params = eval_run.data.params
    assert (params["scoring.cache"], params["sampler.cache"], params["sampler.parallel"]) == ("context", "dual",
                                                                                              "threshold")
    assert params["sampler.threshold"] == "0.9" and params["scoring.parallel"] == "off"
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval")}
    assert {"eval/results.json", "eval/arc_challenge.examples.jsonl"} <= artifacts


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["tasks=[nope]", "ckpt=x"]) == 2
    assert "registered tasks" in capsys.readouterr().err
    assert main(["tasks=[arc_challenge]"]) == 2
    assert "ckpt=PATH is required" in capsys.readouterr().err
    # A missing data file is reported before any checkpoint is read.
    assert main([f"ckpt={tmp_path / 'no_such_run'}", "tasks=[piqa]", f"data.piqa={tmp_path / 'valid.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and "valid.jsonl" in err and "goal" in err
    assert main([f"ckpt={tmp_path / 'no_such_run'}", "tasks=[cloze]", f"data.cloze={__file__}"]) == 2
    assert "checkpoint path does not exist" in capsys.readouterr().err


def test_cli_help_lists_tasks_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "registered tasks: arc_challenge" in out and "scoring" in out and "ckpt" in out


def test_format_table():
    table = format_table({"piqa": {"acc": 0.5, "acc_stderr": 0.05, "n": 100, "seconds": 1.0}})
    assert "piqa" in table and "0.5000" in table and "0.0500" in table and "100" in table


def test_eval_config_round_trips_as_plain_data():
    cfg = EvalConfig(tasks=["gsm8k"], data={"gsm8k": "x"})
    assert asdict(cfg)["data"] == {"gsm8k": "x"}


def test_budget_helpers_read_the_trained_context_and_scale_steps(tmp_path):
    from illada_lightning.budget import fit_budget, trained_context

    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "config.yaml").write_text("stage: all\npretrain:\n  data:\n    max_seq_len: 96\nsft:\n  data:\n"
                                     "    max_seq_len: 128\n")
    assert trained_context(run / "sft", 256) == 128  # the SFT window, not the preset's 256
    assert trained_context(run / "pretrain" / "model.pt", 256) == 96
    assert trained_context(run / "sft", 64) == 64  # never beyond the model's own context
    assert trained_context(tmp_path / "elsewhere.pt", 256) == 256  # no run config: the model's context
    assert fit_budget(256, 256, 64, 32, whole_blocks=True) == (64, 64)  # whole blocks, steps in proportion
    assert fit_budget(100, 50, 64, 100) == (64, 32)
    assert fit_budget(32, 32, 64, 32) == (32, 32)  # fits: unchanged


def test_cli_shortens_a_generation_budget_the_checkpoint_cannot_hold(tmp_path, tiny, capsys):
    """The README's evaluation of the default model: gen_length=256 in a model trained on 128-token windows
    ended in a traceback ("leaves no room for a prompt"); now it is shortened with a note."""
    from illada_lightning.checkpoint import export_model

    model, tokenizer = tiny  # max_seq_len=128
    run_dir = tmp_path / "runs" / "default"
    ckpt = export_model(run_dir / "sft" / "model.pt", model.config, model.state_dict(), tokenizer.backend.to_str())
    (run_dir / "config.yaml").write_text("stage: all\npretrain:\n  data:\n    max_seq_len: 128\nsft:\n  data:\n"
                                         "    max_seq_len: 128\n")
    assert main([f"ckpt={ckpt.parent}", "tasks=[synthetic]", "limit=2", "mlflow=false"]) == 0
    captured = capsys.readouterr()
    assert "note: sampler.gen_length 256 -> 64 (steps 256 -> 64)" in captured.err and "128-token" in captured.err
    assert "synthetic" in captured.out and "Traceback" not in captured.err
    settings = json.loads((run_dir / "sft" / "eval" / "eval_config.json").read_text())
    sampler = settings["sampler"]
    assert (sampler["gen_length"], sampler["steps"], sampler["block_length"]) == (64, 64, 32)
    # a setting problem the budget cannot fix is one line, not a traceback
    assert main([f"ckpt={ckpt.parent}", "tasks=[synthetic]", "limit=2", "mlflow=false",
                 "sampler.variable_length=false", "sampler.gen_length=48", "sampler.block_length=32"]) == 2
    assert "gen_length=48" in capsys.readouterr().err
