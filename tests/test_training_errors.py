"""Bad input to training: each gives a clear error before any training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.run import main as cli_main
from illada_lightning.checkpoint import CheckpointError, export_model
from illada_lightning.config import ConfigError, load_config
from illada_lightning.experiment.config import ExperimentConfig
from illada_lightning.experiment.run import run_experiment
from illada_lightning.training.experiment import RunDirectoryError
from illada_lightning.training.strategy import StrategyError, check_strategy
from tests.test_run_experiment import DEFAULT_YAML, small_config


def no_training_happened(root: Path, name: str) -> bool:
    return not list((root / name).glob("*/checkpoints/*"))


@pytest.mark.parametrize("override, message", [
    ("pretrain.max_stepz=3", "unknown config key 'pretrain.max_stepz'"),
    ("model=huge", "model='huge' is not a known preset"),
    ("stage=finetune", "stage must be one of"),
    ("pretrain.optim.min_lr=1.0", "pretrain.optim.min_lr must be in"),
    ("on_nan=ignore", "on_nan must be"),
    ("pretrain.schedule.smoothing=median", "smoothing must be"),
    ("sft.optim.betas=[0.9]", "sft.optim.betas must be two numbers"),
    ("resume=yes", "resume must be"),
    ("stage=all init_from=x", "init_from is for stage=sft"),
])
def test_bad_config_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(ExperimentConfig, DEFAULT_YAML, override.split())


def test_cli_reports_bad_override_without_traceback(capsys):
    assert cli_main(["pretrain.max_stepz=3"]) == 2
    assert "unknown config key 'pretrain.max_stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["precision=16-mixed"], "strategy=fsdp cannot shard with precision=16-mixed"),
    (["fsdp_cpu_offload=true"], "fsdp_cpu_offload=true offloads GPU memory to the host, but this run is on CPU"),
])
def test_what_fsdp_cannot_shard_is_refused_before_training(tmp_path, overrides, message):
    cfg = small_config(tmp_path, tmp_path / "cache", "strategy=fsdp", "accelerator=cpu", "mlflow.enabled=false",
                       *overrides)
    with pytest.raises(StrategyError, match=message):
        run_experiment(cfg)
    assert not (tmp_path / "default").exists()


def test_fsdp_runs_on_one_device_and_gpu_counts_are_checked(monkeypatch):
    check_strategy("fsdp", "cpu", "1", 1)  # FSDP2 with one shard: the same code path as many (benchmarks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_strategy("fsdp", "auto", "auto", 1, precision="bf16-mixed", cpu_offload=True)
    with pytest.raises(StrategyError, match="asks for 2 GPUs but this machine has 1"):
        check_strategy("ddp", "gpu", "2", 1)
    with pytest.raises(StrategyError, match="fsdp_cpu_offload=true needs strategy=fsdp"):
        check_strategy("ddp", "gpu", "1", 1, cpu_offload=True)


def _fake_checkpoint(path: Path, cfg) -> Path:
    from illada_lightning.model.transformer import MaskPredictor

    return export_model(path, cfg, MaskPredictor(cfg).state_dict(), None)


def test_init_from_missing_and_incompatible(tmp_path, data_cache):
    base = ["stage=sft", "mlflow.enabled=false"]
    with pytest.raises(CheckpointError, match="no such file or directory"):
        run_experiment(small_config(tmp_path, data_cache, *base, f"init_from={tmp_path / 'nope'}"))
    cfg = small_config(tmp_path, data_cache, *base)
    from dataclasses import replace

    wrong_vocab = _fake_checkpoint(tmp_path / "vocab" / "model.pt", replace(cfg.model, vocab_size=1024))
    with pytest.raises(CheckpointError, match=r"vocabulary: checkpoint vocab_size=1024, config model.vocab_size=512"):
        run_experiment(small_config(tmp_path, data_cache, *base, f"init_from={wrong_vocab}"))
    wrong_shape = _fake_checkpoint(tmp_path / "shape" / "model.pt", replace(cfg.model, ffn_dim=96))
    with pytest.raises(CheckpointError, match=r"shapes differ: .*mlp\.gate_up\.weight: checkpoint \(192, 64\)"):
        run_experiment(small_config(tmp_path, data_cache, *base, f"init_from={wrong_shape}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        run_experiment(small_config(tmp_path, data_cache, *base, f"init_from={tmp_path / 'empty'}"))
    assert no_training_happened(tmp_path, "default")


def test_sft_set_longer_than_max_seq_len(tmp_path, data_cache):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "word " * 80, "response": "answer " * 40}) + "\n" for _ in range(5)))
    cfg = small_config(tmp_path, data_cache, "mlflow.enabled=false", f"sft.data.train_files=[{long}]",
                       f"sft.data.val_files=[{long}]")
    with pytest.raises(ConfigError, match="every one of the 5 SFT examples .* is longer than max_seq_len=64"):
        run_experiment(cfg)
    assert no_training_happened(tmp_path, "default")


def test_finished_or_interrupted_run_dir_is_not_overwritten(tmp_path, data_cache):
    stage_dir = tmp_path / "default" / "pretrain"
    (stage_dir / "checkpoints").mkdir(parents=True)
    (stage_dir / "checkpoints" / "step=0000004.ckpt").write_bytes(b"x")
    cfg = small_config(tmp_path, data_cache, "stage=pretrain", "mlflow.enabled=false")
    with pytest.raises(RunDirectoryError, match="interrupted pretrain run .* resume=auto"):
        run_experiment(cfg)
    (stage_dir / "FINISHED").write_text("{}")
    with pytest.raises(RunDirectoryError, match="already holds a finished pretrain run; pass resume=auto"):
        run_experiment(cfg)
    assert (stage_dir / "checkpoints" / "step=0000004.ckpt").read_bytes() == b"x"


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("illada-cache")
