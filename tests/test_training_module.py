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


@pytest.mark.parametrize("plan, wrapped", [
    (True, ["blocks.0", "blocks.1"]), ("full", ["blocks.0", "blocks.1"]), ("1", ["blocks.0"]),
    ("mlp", ["blocks.0.mlp", "blocks.1.mlp"]), (False, []), ("none", [])])
def test_activation_checkpointing_plans_recompute_what_they_say_with_the_same_gradients(plan, wrapped):
    torch.manual_seed(0)
    plain = PretrainModule(CFG)
    ckpt = PretrainModule(CFG, activation_checkpointing=plan)
    ckpt.load_state_dict(plain.state_dict())
    assert [n for n, m in ckpt.model.named_modules() if getattr(m, "_checkpointed", False)] == wrapped
    batch = {"input_ids": torch.randint(4, 64, (2, 16))}
    for m in (plain, ckpt):
        m._loss(batch, m._generator(0)).loss.backward()
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_activation_checkpointing_values_are_checked_with_the_reason(tmp_path):
    from illada_lightning.training.checkpointing import parse_checkpointing

    assert parse_checkpointing("True", 4) == ("blocks", 4) and parse_checkpointing("False", 4) == ("none", 0)
    assert parse_checkpointing(3, 4) == ("blocks", 3) and parse_checkpointing("0", 4) == ("none", 0)
    with pytest.raises(ValueError, match="activation_checkpointing=5: the model has only 4 blocks"):
        parse_checkpointing("5", 4)
    with pytest.raises(ValueError, match="must be none\\|full\\|mlp .*got 'selective'"):
        parse_checkpointing("selective", 4)
    with pytest.raises(ValueError, match="activation_checkpointing=9: the model has only 2 blocks"):
        small_config(tmp_path, tmp_path, "activation_checkpointing=9")  # the test config's model has 2


def test_float8_is_refused_where_it_cannot_run(monkeypatch):
    import importlib.util

    from illada_lightning.training.float8 import Float8Error, check_float8, float8_eligible

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(Float8Error, match="float8=true needs torchao"):
        check_float8("gpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao" else real(name, *a))
    with pytest.raises(Float8Error, match=r"float8 tensor cores \(compute capability >= 8\.9.*accelerator=cpu"):
        check_float8("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(Float8Error, match="NVIDIA A100 has 8.0"):
        check_float8("gpu")
    # what would be converted: the blocks' linears with dimensions divisible by 16, never the LM head
    model = PretrainModule(CFG).model
    assert all(float8_eligible(m, n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert not float8_eligible(torch.nn.Linear(32, 24), "blocks.0.mlp.down")
    assert not float8_eligible(torch.nn.Linear(32, 64), "lm_head")


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
                        lr_scale=lr_scale, nan_check=cfg.nan_check)
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


def test_on_nan_deferred_check_skips_on_the_device_and_saves_the_same_weights(tmp_path, data_cache, nan_module):
    """nan_check=deferred (no host sync per step): the NaN step and the one after it are skipped inside the fused
    AdamW, the stop names the step where it happened, and the saved weights are those of the synchronous check."""
    fused = ["pretrain.optim.fused=true"]
    saved = {}
    for mode in ("sync", "deferred"):
        root = tmp_path / mode
        with pytest.raises(NonFiniteLossError, match="non-finite at step 5 "):
            run_experiment(small_config(root, data_cache, *COMMON, *fused, "on_nan=stop", f"nan_check={mode}"),
                           preview=False)
        (path,) = (root / "default" / "pretrain" / "checkpoints").glob("nonfinite-step=0000005.ckpt")
        saved[mode] = torch.load(path, weights_only=False)
    assert saved["deferred"]["global_step"] == saved["sync"]["global_step"] + 1  # read one step later
    for name, value in saved["sync"]["state_dict"].items():
        assert torch.equal(saved["deferred"]["state_dict"][name], value), name
    moments = [s["optimizer_states"][0]["state"] for s in (saved["sync"], saved["deferred"])]
    for a, b in zip(moments[0].values(), moments[1].values()):
        assert float(a["step"]) == float(b["step"]) and torch.equal(a["exp_avg"], b["exp_avg"])


def test_deferred_check_needs_the_fused_optimizer(tmp_path, data_cache):
    with pytest.raises(ValueError, match="nan_check=deferred .* set pretrain.optim.fused=true"):
        small_config(tmp_path, data_cache, *COMMON, "nan_check=deferred", "pretrain.optim.fused=false").validate()


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
