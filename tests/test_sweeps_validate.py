"""Bad sweep input fails before any trial starts; sweep files, multirun parsing, the pruning callback."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch

from illada_lightning.config import ConfigError
from illada_lightning.sweeps import (
    ParamSpec,
    SweepError,
    SweepSpec,
    load_sweep_spec,
    run_sweep,
    validate_sweep,
)
from illada_lightning.sweeps.multirun import launch_multirun, parse_multirun, parse_scalar, split_top_level
from illada_lightning.sweeps.pruning import OptunaPruningCallback
from illada_lightning.sweeps.space import param_values
from illada_lightning.sweeps.spec import EvaluationSpec, ObjectiveSpec, SamplerSpec
from illada_lightning.sweeps.study import budget

REPO = Path(__file__).resolve().parents[1]
TOY = "tests.sweep_fakes:ToyExperimentConfig"
TOY_EVAL = "tests.sweep_fakes:ToyEvalConfig"
CALLS: list = []


def spy_trial(ctx):
    CALLS.append(ctx.params)
    return {"eval/toy/acc": 0.5}


spy_trial.declared_metrics = ("eval/toy/acc",)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one costs seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def toy_spec(tmp_path, space=None, **kw) -> SweepSpec:
    kw.setdefault("tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    kw.setdefault("objective", ObjectiveSpec("eval/toy/acc", "maximize"))
    return SweepSpec(name="v", schema=TOY, evaluation=EvaluationSpec(schema=TOY_EVAL), output_dir=str(tmp_path / "out"),
                     space=space or {"sft.epochs": ParamSpec(type="categorical", choices=[1, 2])}, **kw)


def assert_fails_before_trials(spec, match):
    CALLS.clear()
    with pytest.raises(SweepError, match=match):
        run_sweep(spec, spy_trial)
    assert CALLS == []


def test_unknown_key_and_invalid_value_fail_before_any_trial(tmp_path):
    spec = toy_spec(tmp_path, {"sft.epochz": ParamSpec(type="categorical", choices=[1, 2])})
    assert_fails_before_trials(spec, r"search space key 'sft\.epochz'.*unknown config key")
    spec = toy_spec(tmp_path, {"eval.scoring_rule": ParamSpec(type="categorical", choices=["confidence", "bogus"])})
    assert_fails_before_trials(spec, r"'eval\.scoring_rule' \(value 'bogus'\).*not one of")
    spec = toy_spec(tmp_path, {"sft.epochs": ParamSpec(type="categorical", choices=[1, "many"])})
    assert_fails_before_trials(spec, r"'sft\.epochs' \(value 'many'\).*expects int")
    assert not (tmp_path / "out" / "optuna.db").exists()


@pytest.mark.parametrize("param, match", [
    ({"type": "float", "low": 1.0, "high": 1.0}, r"'lr'.*invalid range low=1.0 >= high=1.0"),
    ({"type": "float", "low": 2.0, "high": 1.0}, r"'lr'.*invalid range"),
    ({"type": "logfloat", "low": 0.0, "high": 1.0}, r"'lr'.*log-scale range needs low > 0"),
    ({"type": "float", "low": -1.0, "high": 1.0, "log": True}, r"'lr'.*log-scale range needs low > 0"),
    ({"type": "categorical", "choices": []}, r"'lr'.*non-empty `choices`"),
    ({"type": "int", "low": 1.5, "high": 3}, r"'lr'.*integer low/high"),
    ({"type": "uniform", "low": 1, "high": 3}, r"'lr'.*type 'uniform' is not one of"),
    ({"type": "float", "low": 1e-4, "high": 1e-2}, r"'lr'.*grid sampler needs finite values"),
])
def test_invalid_ranges_are_rejected_when_the_file_loads(tmp_path, param, match):
    body = {"name": "r", "space": {"lr": param}, "sampler": {"type": "grid"}}
    path = tmp_path / "r.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(body), path)
    with pytest.raises(ConfigError, match=match):
        load_sweep_spec(path)


@pytest.mark.parametrize("metric, match", [
    ("eval/notatask/acc", r"task 'notatask' is not a registered evaluation task \(registered: .*cloze"),
    ("eval/cloze/accuracy_typo", r"'accuracy_typo' is not an evaluation metric name"),
    ("val/los", r"logged by no run"),
])
def test_objective_metrics_nobody_logs_are_rejected(tmp_path, metric, match):
    spec = toy_spec(tmp_path, objective=ObjectiveSpec(metric, "maximize"))
    CALLS.clear()
    with pytest.raises(SweepError, match=match):
        validate_sweep(spec)  # no declared metrics: the registry decides
    spec = toy_spec(tmp_path, objective=ObjectiveSpec("eval/toy/acx", "maximize"))
    assert_fails_before_trials(spec, r"'eval/toy/acx' is not logged by this trial function")


@pytest.mark.parametrize("url, match", [
    ("sqlite:////proc/no/such/dir/optuna.db", r"cannot open Optuna storage 'sqlite:////proc"),
    ("nosuchdialect://user@host/db", r"cannot open Optuna storage 'nosuchdialect"),
])
def test_unopenable_storage_fails_before_any_trial(tmp_path, url, match):
    assert_fails_before_trials(toy_spec(tmp_path, storage=url), match)


def test_the_shipped_sweep_files_validate_on_the_data_the_project_has(tmp_path, monkeypatch, store):
    """Every shipped sweep validates as shipped (keys, metric, stores, data files); the only file outside the
    repository is GSM8K (staged in ../shared/data, replaced here by a stand-in so tests never need it)."""
    monkeypatch.chdir(REPO)
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"scoring_rule", "sft_epochs", "block_length", "remasking", "lr_search"}
    modes = {}
    for f in files:
        spec = load_sweep_spec(f, [f"output_dir={tmp_path / f.stem}", f"tracking_uri={store}",
                                   f"evaluation.data.gsm8k={gsm8k}"])
        validate_sweep(spec)
        modes[f.stem] = (spec.mode, spec.sampler.type)
    assert modes["scoring_rule"] == ("eval_only", "grid") and modes["sft_epochs"] == ("per_epoch", "grid")
    assert modes["lr_search"] == ("train", "tpe")


def test_missing_task_data_is_named_with_where_to_get_it_and_a_pointed_file_enables_the_task(tmp_path, monkeypatch,
                                                                                             store):
    monkeypatch.chdir(REPO)
    common = [f"output_dir={tmp_path / 'o'}", f"tracking_uri={store}"]
    paper = [*common, "evaluation.tasks=[cloze,piqa,arc_challenge,hellaswag]",
             f"evaluation.data.piqa={tmp_path / 'nope' / 'valid.jsonl'}"]
    with pytest.raises(SweepError, match=r"3 evaluation task\(s\) have no data file") as info:
        validate_sweep(load_sweep_spec(REPO / "sweeps" / "scoring_rule.yaml", paper))
    text = str(info.value)
    for task in ("piqa", "arc_challenge", "hellaswag"):
        assert f"task '{task}': data file not found" in text
    assert str(tmp_path / "nope" / "valid.jsonl") in text and "yonatanbisk.com/piqa" in text
    assert "cloze" not in text.split("\n", 1)[1]  # the repository's corpus is there
    (tmp_path / "piqa.jsonl").touch()
    (tmp_path / "arc.jsonl").touch()
    (tmp_path / "hs.jsonl").touch()
    validate_sweep(load_sweep_spec(REPO / "sweeps" / "scoring_rule.yaml", [
        *common, "evaluation.tasks=[cloze,piqa,arc_challenge,hellaswag]", f"evaluation.data.piqa={tmp_path}/piqa.jsonl",
        f"evaluation.data.arc_challenge={tmp_path}/arc.jsonl", f"evaluation.data.hellaswag={tmp_path}/hs.jsonl"]))


def test_space_values_and_budget():
    assert param_values(ParamSpec(type="int", low=2, high=8, step=3)) == [2, 5, 8]
    assert param_values(ParamSpec(type="float", low=0.1, high=0.3, step=0.1)) == [0.1, 0.2, 0.3]
    grid = SweepSpec(space={"a": ParamSpec(choices=[1, 2]), "b": ParamSpec(choices=["x", "y", "z"])})
    assert budget(grid) == 6
    grid.n_trials = 4
    assert budget(grid) == 4
    assert budget(SweepSpec(space=grid.space, sampler=SamplerSpec(type="tpe"), n_trials=9)) == 9


def test_multirun_parsing():
    assert split_top_level("a,[b,c],'d,e'") == ["a", "[b,c]", "'d,e'"]
    assert [parse_scalar(v) for v in ("4", "1e-3", "true", "confidence")] == [4, 0.001, True, "confidence"]
    args = ["--multirun", "sft.epochs=1,2,4", "eval.scoring_rule=confidence,likelihood", "model=tiny",
            "eval.tasks=[cloze,piqa]", "sweep.n_workers=2", "sweep.objective.metric=eval/cloze/acc"]
    spec = parse_multirun(args)
    assert spec.space["sft.epochs"].choices == [1, 2, 4]
    assert spec.space["eval.scoring_rule"].choices == ["confidence", "likelihood"]
    assert spec.overrides == ["model=tiny", "eval.tasks=[cloze,piqa]"]
    assert spec.n_workers == 2 and spec.sampler.type == "grid"
    assert spec.objective.resolve_direction() == "maximize"
    assert parse_multirun(args).name == spec.name  # the same command resumes the same study
    assert parse_multirun([*args, "seed=1"]).name != spec.name
    with pytest.raises(ValueError, match="comma-separated"):
        parse_multirun(["model=tiny"])
    with pytest.raises(ConfigError, match="n_workerz"):
        parse_multirun(["a=1,2", "sweep.n_workerz=2"])


def test_launch_multirun_runs_a_grid_and_resumes(tmp_path, capsys):
    args = ["sft.epochs=1,2", "eval.scoring_rule=confidence,likelihood", f"sweep.schema={TOY}",
            "sweep.trial_fn=tests.sweep_fakes:fake_trial", "sweep.objective.metric=eval/toy/acc",
            f"sweep.evaluation.schema={TOY_EVAL}",
            f"sweep.output_dir={tmp_path / 'mr'}", f"sweep.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    result = launch_multirun(args)
    assert (result.n_complete, result.best_value) == (4, pytest.approx(0.57))
    out = capsys.readouterr().out
    assert "4 complete" in out and "`eval/toy/acc`" in out  # the verdict names the metric it judges
    assert "report: python -m reports.make --sweep multirun-" in out
    again = launch_multirun(args)
    assert again.n_complete == 4 and again.parent_run_id == result.parent_run_id


class _Tiny(pl.LightningModule):
    """Validation loss scripted per epoch: offset + 1.0, 0.9, 0.8, ..."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, _):
        self.log("val/loss", torch.tensor(self.offset + 1.0 - 0.1 * self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    val_dataloader = train_dataloader


def _fit(trial, offset=0.0):
    trainer = pl.Trainer(max_epochs=3, callbacks=[OptunaPruningCallback(trial, "val/loss")], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(_Tiny(offset))
    return trainer


def test_pruning_callback_reports_each_validation_and_prunes_with_lightning_2():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    _fit(good)
    # one report per validation, at the optimizer step (2 batches per epoch)
    assert study._storage.get_trial(good._trial_id).intermediate_values == pytest.approx({2: 1.0, 4: 0.9, 6: 0.8})
    study.tell(good, 0.8)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        _fit(bad, offset=5.0)  # worse than the median at its first validation: training stops there
    assert study._storage.get_trial(bad._trial_id).intermediate_values == pytest.approx({2: 6.0})


def test_sweeps_run_cli_validates_and_reports_errors(tmp_path, capsys, store):
    from sweeps.run import main

    common = [f"output_dir={tmp_path / 'o'}", f"tracking_uri={store}"]
    assert main([str(REPO / "sweeps" / "scoring_rule.yaml"), "--validate", *common]) == 0
    assert "sweep 'scoring_rule' is valid" in capsys.readouterr().out
    assert main([str(REPO / "sweeps" / "scoring_rule.yaml"), "--validate", *common,
                 "objective.metric=eval/nosuch/acc"]) == 2
    assert "task 'nosuch' is not a registered evaluation task" in capsys.readouterr().err
    assert main([str(REPO / "sweeps" / "lr_search.yaml"), "--validate", *common, "n_workerz=2"]) == 2
    assert "n_workerz" in capsys.readouterr().err


def test_multirun_is_tracked_where_experiments_run_tracks_a_run(tmp_path):
    """`experiments.run --multirun` landed in an experiment of its own (`multirun-<hash>`), so the README's next
    command (`reports.make --experiment illada-lightning`) and its UI steps could not show it."""
    spec = parse_multirun(["--multirun", "pretrain.optim.lr=1e-3,3e-3", "stage=pretrain"])
    assert spec.name.startswith("multirun-") and spec.resolved_mlflow_experiment == "illada-lightning"
    mine = parse_multirun(["--multirun", "pretrain.optim.lr=1e-3,3e-3", "mlflow.experiment_name=mine",
                           f"runs_root={tmp_path}"])
    assert mine.resolved_mlflow_experiment == "mine"
    assert mine.resolved_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mine.resolved_output_dir == tmp_path / "sweeps" / mine.name
    told = parse_multirun(["--multirun", "pretrain.optim.lr=1e-3,3e-3", "sweep.mlflow_experiment=lr",
                           "sweep.tracking_uri=sqlite:///x.db"])
    assert (told.resolved_mlflow_experiment, told.resolved_tracking_uri) == ("lr", "sqlite:///x.db")
