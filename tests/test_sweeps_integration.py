"""A real (tiny) sweep through the library entry points of `experiments.run` and `experiments.evaluate`:
a train-mode grid, an eval-only sweep reusing its checkpoint, and the report built from MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from illada_lightning.reporting import build_report
from illada_lightning.sweeps import ParamSpec, SweepSpec, run_sweep
from illada_lightning.sweeps.spec import EvaluationSpec, ObjectiveSpec
from illada_lightning.sweeps.study import open_storage

pytest.importorskip("illada_lightning.training.experiment")
pytest.importorskip("illada_lightning.evaluation.cli")

pytestmark = pytest.mark.slow  # real (tiny) trainings and evaluations
REPO = Path(__file__).resolve().parents[1]
HELD_OUT = REPO / "data" / "corpus" / "valid.txt"  # the shipped corpus: tests never read ../shared
TINY = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
    "model.vocab_size=512", "model.max_seq_len=64", "tokenizer.vocab_size=512", "pretrain.data.max_seq_len=64",
    "pretrain.batch_size=8", "pretrain.log_every_n_steps=2", "pretrain.limit_val_batches=2", "progress_bar=false",
    "stage=pretrain", "pretrain.max_steps=4", "pretrain.val_every_n_steps=2", "pretrain.optim.warmup_steps=1",
]


def test_real_train_sweep_then_eval_only_sweep_then_report(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = [f"pretrain.data.cache_dir={tmp_path / 'cache'}", f"sft.data.cache_dir={tmp_path / 'cache'}"]
    train = SweepSpec(
        name="tiny_lr", mode="train", experiment=str(REPO / "experiments/configs/default.yaml"),
        overrides=[*TINY, *cache], space={"pretrain.optim.lr": ParamSpec(choices=[1e-3, 3e-3])},
        objective=ObjectiveSpec("val/loss", "minimize"), output_dir=str(tmp_path / "lr"), tracking_uri=uri,
    )
    result = run_sweep(train)
    assert (result.n_complete, result.n_failed) == (2, 0)
    client = MlflowClient(uri)
    study = optuna.load_study(study_name="tiny_lr", storage=open_storage(train.resolved_storage))
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        # the trial run is the experiment's parent run: full config params, nested under the sweep parent,
        # with the training code's pretrain run nested under it
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.params["pretrain.optim.lr"] == str(trial.params["pretrain.optim.lr"])
        assert run.data.params["model.n_layers"] == "2"
        assert run.data.metrics["val/loss"] == pytest.approx(trial.value)
        stage_runs = json.loads((tmp_path / "lr" / f"trial_{trial.number:04d}" / "mlflow_runs.json").read_text())
        assert stage_runs["parent"] == run.info.run_id
        pretrain = client.get_run(stage_runs["pretrain"])
        assert pretrain.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert len(client.get_metric_history(pretrain.info.run_id, "train/loss")) >= 2

    checkpoint = tmp_path / "lr" / "trial_0000" / "pretrain" / "model.pt"
    evals = SweepSpec(
        name="tiny_scoring", mode="eval_only", checkpoint=str(checkpoint),
        space={"eval.scoring.rule": ParamSpec(choices=["likelihood", "confidence"])},
        evaluation=EvaluationSpec(overrides=["tasks=[cloze]", f"data.cloze={HELD_OUT}", "limit=6", "scoring.mc_samples=2",
                                             "cloze_items=6", "device=cpu"]),
        objective=ObjectiveSpec("eval/cloze/acc", "maximize"), output_dir=str(tmp_path / "sc"), tracking_uri=uri,
    )
    scored = run_sweep(evals)
    assert (scored.n_complete, scored.n_failed) == (2, 0)
    study = optuna.load_study(study_name="tiny_scoring", storage=open_storage(evals.resolved_storage))
    accs = {t.params["eval.scoring.rule"]: t.value for t in study.trials}
    assert set(accs) == {"likelihood", "confidence"}
    for trial in study.trials:  # GridSampler's (seeded) order, not the YAML's
        results = json.loads((tmp_path / "sc" / f"trial_{trial.number:04d}" / "eval" / "results.json").read_text())
        assert results["cloze"]["acc"] == pytest.approx(trial.value)

    report = build_report(uri, sweep="tiny_scoring", out_root=tmp_path / "reports")
    md = report.path.read_text()
    for rule, acc in accs.items():
        assert f"| {rule} | {acc * 100:.1f} ± " in md  # every accuracy with its standard error and n
    assert report.logged_to == [scored.parent_run_id]


def test_multirun_over_training_and_eval_keys_trains_each_config_once(tmp_path):
    from experiments.run import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = [f"pretrain.data.cache_dir={tmp_path / 'cache'}", f"sft.data.cache_dir={tmp_path / 'cache'}"]
    # Through the experiment command line, exactly as a user types it.
    assert main([
        str(REPO / "experiments/configs/default.yaml"), "--multirun", *TINY, *cache, "pretrain.val_every_n_steps=0",
        "eval.scoring.rule=likelihood,confidence", "eval.tasks=[cloze]", f"eval.data.cloze={HELD_OUT}", "eval.limit=4",
        "eval.scoring.mc_samples=2",
        "eval.cloze_items=4", "eval.device=cpu", "sweep.objective.metric=eval/cloze/acc",
        f"sweep.output_dir={tmp_path / 'mr'}", f"sweep.tracking_uri={uri}",
    ]) == 0
    storage = open_storage(f"sqlite:///{tmp_path / 'mr' / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(uri)
    first, second = study.trials
    assert first.user_attrs["training"]["key"] == second.user_attrs["training"]["key"]
    assert (tmp_path / "mr" / "trial_0000" / "pretrain" / "model.pt").exists()
    assert not (tmp_path / "mr" / "trial_0001" / "pretrain").exists()  # evaluated the first trial's model
    run = client.get_run(second.user_attrs["mlflow_run_id"])
    assert run.data.tags["sweep.reused_training_of_trial"] == "0"
    assert {first.params["eval.scoring.rule"], second.params["eval.scoring.rule"]} == {"likelihood", "confidence"}
    assert run.data.params["eval.scoring.rule"] == second.params["eval.scoring.rule"]  # GridSampler's order
    assert "eval/cloze/acc" in run.data.metrics


def test_per_epoch_sweep_trains_once_and_reads_each_epoch(tmp_path):
    lines = (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines()
    (tmp_path / "sft.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[16:24]) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(
        name="tiny_epochs", mode="per_epoch", experiment=str(REPO / "experiments/configs/default.yaml"),
        overrides=[*(o for o in TINY if not o.startswith("stage=")), "stage=all", "pretrain.val_every_n_steps=0",
                   "sft.data.max_seq_len=64", "sft.batch_size=8", "sft.val_every_n_steps=0",
                   "sft.optim.warmup_steps=1", f"sft.data.train_files=[{tmp_path / 'sft.jsonl'}]",
                   f"sft.data.val_files=[{tmp_path / 'val.jsonl'}]",
                   f"pretrain.data.cache_dir={tmp_path / 'cache'}", f"sft.data.cache_dir={tmp_path / 'cache'}"],
        space={"sft.epochs": ParamSpec(choices=[1, 2])},
        evaluation=EvaluationSpec(overrides=["tasks=[synthetic]", "subset_size=4", "sampler.gen_length=8",
                                             "sampler.block_length=8", "sampler.steps=8"]),
        objective=ObjectiveSpec("eval/synthetic/exact_match", "maximize"), output_dir=str(tmp_path / "ep"),
        tracking_uri=uri,
    )
    result = run_sweep(spec)
    assert (result.n_complete, result.n_failed) == (2, 0)
    study = optuna.load_study(study_name="tiny_epochs", storage=open_storage(spec.resolved_storage))
    setup = study.user_attrs["sweep_setup"]
    assert setup["epochs"] == 2 and Path(setup["checkpoint"]).exists()
    assert not list((tmp_path / "ep").glob("trial_*/sft"))  # no trial trained
    client = MlflowClient(uri)
    history = {m.step: m.value for m in client.get_metric_history(setup["history_run_id"],
                                                                   "eval/synthetic/exact_match")}
    assert sorted(history) == [1, 2]  # the SFT run evaluated after each of its 2 epochs
    for trial in study.trials:
        assert trial.value == pytest.approx(history[trial.params["sft.epochs"]])
