"""DiffusionLMModule: parameter groups, fixed validation masks, the non-finite-loss guard (stop / rollback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import illada_lightning.training.stage as stage_runner
from illada_lightning.experiment.run import run_experiment
from illada_lightning.model.config import ModelConfig
from illada_lightning.training.callbacks import NonFiniteLossError
from illada_lightning.training.module import PretrainModule, SFTModule, weight_decay_groups
from tests.test_run_experiment import small_config

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16)


def test_weight_decay_on_matrices_only():
    module = PretrainModule(CFG)
    decay, no_decay = weight_decay_groups(module.model, 0.1)
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "blocks.1.attn_norm.weight",
        "blocks.1.mlp_norm.weight", "norm.weight"}
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}  # tied embedding = LM head: decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_validation_masks_are_fixed_and_sft_module_differs_only_in_schedule():
    module = PretrainModule(CFG, seed=3)
    batch = {"input_ids": torch.randint(4, 64, (4, 16))}
    gen = module._generator(123)
    first = module._loss(batch, gen).loss
    again = module._loss(batch, module._generator(123)).loss
    assert torch.equal(first, again)
    # One objective for both stages: same weights, batch and mask seed give the same loss and gradients.
    sft = SFTModule(CFG, seed=3)
    sft.load_state_dict(module.state_dict())
    assert torch.equal(sft._loss(batch, sft._generator(123)).loss, first)
    # They differ in the LR schedule only: SFT decays linearly over the last 10 % of its steps (iLLaDA §2.2),
    # pretraining stays constant until the plateau switch.
    lrs = {}
    for m in (module, sft):
        m.total_steps = lambda: 100
        m.optim.warmup_steps = 10
        sched = m.make_scheduler(torch.optim.SGD(m.parameters(), lr=1.0))
        for _ in range(95):
            sched.step()
        lrs[type(m).__name__] = sched.get_last_lr()[0]
    assert lrs["PretrainModule"] == module.optim.lr and lrs["SFTModule"] < sft.optim.lr


def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    plain = PretrainModule(CFG)
    ckpt = PretrainModule(CFG, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    batch = {"input_ids": torch.randint(4, 64, (2, 16))}
    for m in (plain, ckpt):
        m._loss(batch, m._generator(0)).loss.backward()
    torch.testing.assert_close(ckpt.model.blocks[0].mlp.down.weight.grad, plain.model.blocks[0].mlp.down.weight.grad)


class NaNAt(PretrainModule):
    """Produces a non-finite loss at optimizer step `at` (only for the run with lr_scale == 1)."""

    at = 5

    def _loss(self, batch, generator):
        out = super()._loss(batch, generator)
        if self.training and self.global_step == self.at and self.lr_scale == 1.0:
            out.loss = out.loss * float("nan")
        return out


@pytest.fixture()
def nan_module(monkeypatch):
    original = stage_runner.build_module

    def build(cfg, stage, lr_scale=1.0):
        module = original(cfg, stage, lr_scale)
        if stage == "pretrain":
            nan = NaNAt(cfg.model, cfg.diffusion, cfg.pretrain.optim, cfg.pretrain.schedule, seed=cfg.seed,
                        lr_scale=lr_scale)
            return nan
        return module

    monkeypatch.setattr(stage_runner, "build_module", build)


COMMON = ["stage=pretrain", "pretrain.max_steps=8", "pretrain.ckpt_every_n_steps=4", "mlflow.enabled=false",
          "pretrain.val_every_n_steps=0", "pretrain.optim.warmup_steps=2"]


def test_on_nan_stop_saves_last_good_state(tmp_path, data_cache, nan_module):
    with pytest.raises(NonFiniteLossError, match="non-finite at step 5 .*resume=auto") as info:
        run_experiment(small_config(tmp_path, data_cache, *COMMON, "on_nan=stop"), preview=False)
    ckpt_dir = tmp_path / "default" / "pretrain" / "checkpoints"
    saved = ckpt_dir / "nonfinite-step=0000005.ckpt"
    assert str(saved) in str(info.value)
    state = torch.load(saved, weights_only=False)
    assert state["global_step"] == 6  # Lightning counts the skipped step (no gradient, so no update)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "default" / "pretrain" / "FINISHED").exists()


def test_on_nan_rollback_reloads_and_lowers_lr(tmp_path, data_cache, nan_module):
    cfg = small_config(tmp_path, data_cache, *COMMON, "on_nan=rollback", "nan_lr_scale=0.25")
    result = run_experiment(cfg, preview=False)
    summary = result["stages"]["pretrain"]
    assert summary["rollbacks"] == 1 and summary["global_step"] == 8
    last = torch.load(Path(summary["checkpoint"]), weights_only=False)
    sched = last["lr_schedulers"][0]
    assert sched["lr_scale"] == 0.25
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.25 * cfg.pretrain.optim.lr)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("illada-cache")
