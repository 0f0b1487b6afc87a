"""LoRA SFT (issue 26) on CPU with a tiny model: peft adapters on the block projections, the target check,
training that moves only the adapters, checkpoints that hold (and name) them, and merged exports that give
the adapted model's logits. End-to-end runs (init_from a released-style directory, MLflow, per-epoch
evaluation, resume, FSDP2, a multirun over the rank) are in tests/test_lora_runs.py."""

from __future__ import annotations

from dataclasses import asdict

import lightning.pytorch as pl
import pytest
import torch

import illada_lightning as il
from experiments.export import main as export_main
from illada_lightning.config import ConfigError, load_config
from illada_lightning.model.config import get_preset
from illada_lightning.model.lora import (
    LoraError,
    adapted_parameter_counts,
    add_adapters,
    base_layout,
    check_targets,
    is_adapter_param,
    merge_adapters,
    parameter_counts,
)
from illada_lightning.model.lora_config import DEFAULT_TARGETS, LoraConfig
from illada_lightning.training.config import OptimConfig, TrainingConfig
from illada_lightning.training.lora import check_lora, trainer_precision
from illada_lightning.training.module import SFTModule
from illada_lightning.training.strategy import make_strategy

ARCH = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=48, vocab_size=320, max_seq_len=32)


def tiny(**overrides):
    return il.build_model(get_preset("tiny", **{**ARCH, **overrides}))


def probe() -> torch.Tensor:
    return torch.randint(4, ARCH["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(probe()).float()


# ----------------------------------------------------------------------------- adapters and targets


@pytest.mark.parametrize("tied", [True, False])
def test_default_targets_adapt_the_four_projections_of_every_block_and_freeze_the_rest(tied):
    model = tiny(tie_embeddings=tied)
    before = parameter_counts(model)["total_params"]
    rank = 4
    add_adapters(model, LoraConfig(rank=rank))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == {f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS}
    # r (in + out) per adapted Linear: qkv 32 -> 64 (2 query heads + 2 x 1 kv head of 16), out 32 -> 32,
    # gate_up 32 -> 96, down 48 -> 32
    per_block = rank * ((32 + 64) + (32 + 32) + (32 + 96) + (48 + 32))
    counts = parameter_counts(model)
    assert counts == {"trainable_params": 2 * per_block, "total_params": before + 2 * per_block}
    assert adapted_parameter_counts(model.config, LoraConfig(rank=rank)) == counts  # the meta-device count
    assert type(model).__name__ == "MaskPredictor" and model.output_weight.requires_grad is False
    assert logits(model).shape == (2, 16, 320)


def test_illada_8b_rank_16_trains_half_a_percent_counted_on_the_meta_device():
    from experiments.inspect import main as inspect_main

    info = inspect_main(["model=illada_8b", "lora.rank=16"])
    d, kv, ffn = 4096, 8 * 128, 14_336  # iLLaDA 8B: 32 blocks, GQA with 8 KV heads of 128
    per_block = 16 * ((d + d + 2 * kv) + (d + d) + (d + 2 * ffn) + (ffn + d))
    assert info["lora.trainable_params"] == 32 * per_block == 35_651_584
    assert info["lora.total_params"] == info["total_params"] + 32 * per_block
    assert 0.004 < info["lora.trainable_params"] / info["lora.total_params"] < 0.005


@pytest.mark.parametrize("targets, match", [
    (["q_proj", "v_proj"], r"'q_proj' matches no module of the model; the block projections are attn\.qkv, attn\.out"),
    (["blocks.0.attn.qkv"], r"adapt attn\.qkv in 1 of 2 blocks \(matched: blocks\.0\.attn\.qkv; not matched: "
                            r"blocks\.1\.attn\.qkv\)"),
    (["attn.qkv", "blocks.1.mlp.down"], r"adapt mlp\.down in 1 of 2 blocks \(matched: blocks\.1\.mlp\.down; not "
                                        r"matched: blocks\.0\.mlp\.down\)"),
    (["lm_head"], r"'lm_head' matches lm_head: not a Linear projection inside a Transformer block"),
    (["attn_norm"], r"'attn_norm' matches blocks\.0\.attn_norm, blocks\.1\.attn_norm: not a Linear projection"),
])
def test_targets_that_miss_or_adapt_only_some_blocks_are_refused_with_the_names(targets, match):
    model = tiny(tie_embeddings=False)
    with pytest.raises(LoraError, match=match):
        add_adapters(model, LoraConfig(rank=2, targets=targets))
    assert not any(is_adapter_param(n) for n, _ in model.named_parameters())  # refused before injecting
    # every block named one by one is fine: the union covers all layers
    names = check_targets(model, LoraConfig(rank=2, targets=["blocks.0.attn.qkv", "blocks.1.attn.qkv"]))
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_lora_options_are_checked_when_the_config_loads_and_the_targets_before_training():
    base = ["model=tiny", "model.n_layers=2"]
    with pytest.raises(ConfigError, match=r"sft\.lora\.rank must be an integer >= 0"):
        load_config(TrainingConfig, None, [*base, "sft.lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"sft\.lora\.dropout must be in \[0, 1\)"):
        load_config(TrainingConfig, None, [*base, "sft.lora.dropout=1.5"])
    cfg = load_config(TrainingConfig, None, [*base, "sft.lora.rank=8", "sft.lora.targets=[attn.qkv,wq]"])
    with pytest.raises(LoraError, match=r"'wq' matches no module"):
        check_lora(cfg)  # preflight's check (tests/test_lora_runs.py: run_experiment refuses before training)
    cfg.stage = "pretrain"
    check_lora(cfg)  # no SFT stage, nothing to adapt


def test_merged_weights_give_the_adapted_models_logits_and_the_inputs_stay_untouched():
    model = tiny()
    reference = logits(model)
    cfg = LoraConfig(rank=4, alpha=8.0)
    add_adapters(model, cfg, seed=3)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)  # B = 0: the adapted model starts as the base
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    adapted = logits(model)
    assert (adapted - reference).abs().max() > 1e-2  # the adapters act
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_adapters(state, model.config, cfg)
    assert set(merged) == set(tiny().state_dict()) == set(base_layout(state))  # the base names
    plain = il.model.MaskPredictor(model.config)
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k  # a safe merge: never writes into the state it reads
    # the same seed draws the same adapters (every rank of a sharded run starts alike)
    first, second = (add_adapters(tiny(), cfg, seed=3).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first if "lora_A" in k)


# ----------------------------------------------------------------------------- training (Lightning, CPU)


def fit(lora: LoraConfig | None, precision: str = "32-true", steps: int = 3, accelerator: str = "cpu",
        strategy: str = "auto", activation_checkpointing: bool = False):
    """A few SFT steps of the real module on random batches; returns (module, trainer, initial weights)."""
    torch.manual_seed(0)
    module = SFTModule(get_preset("tiny", **ARCH), optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0),
                       seed=5, lora=lora, activation_checkpointing=activation_checkpointing)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(4, ARCH["vocab_size"], (4, 32), generator=g)} for _ in range(steps)]
    strategy = make_strategy(strategy, accelerator, "1", precision=precision)
    precision, plugins = trainer_precision(precision, lora)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         strategy=strategy,
                         enable_progress_bar=False, enable_model_summary=False, precision=precision,
                         plugins=plugins or None, gradient_clip_val=1.0)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module, trainer, initial


@pytest.fixture(scope="module")
def lora_fit():
    return fit(LoraConfig(rank=4, alpha=8.0))


def test_only_the_adapters_change_in_training(lora_fit):
    module, _, initial = lora_fit
    # the adapters as they started: drawn from the module's seed, whatever the base weights
    start = add_adapters(il.model.MaskPredictor(module.model.config), module.lora, seed=module.seed).state_dict()
    optimizer = module.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in module.model.named_parameters():
        assert (id(p) in in_optimizer) == is_adapter_param(name), name  # AdamW holds the adapters only
        if is_adapter_param(name):
            assert p.requires_grad and not torch.equal(p, start[name]), name  # A and B (from 0) both moved
        else:
            assert not p.requires_grad and torch.equal(p, initial[name.replace(".base_layer.", ".")]), name


def test_rank_zero_is_plain_sft_bitwise():
    off, _, _ = fit(LoraConfig(rank=0))
    plain, _, _ = fit(None)
    assert not any(is_adapter_param(n) for n in off.model.state_dict())
    for k, v in plain.model.state_dict().items():
        assert torch.equal(off.model.state_dict()[k], v), k


def test_block_checkpointing_recomputes_through_the_adapters(lora_fit):
    module, _, _ = fit(LoraConfig(rank=4, alpha=8.0), activation_checkpointing=True)
    reference = lora_fit[0].model.state_dict()
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)


def test_bf16_true_keeps_the_frozen_base_bf16_and_the_adapters_fp32():
    module, _, initial = fit(LoraConfig(rank=4), precision="bf16-true", steps=2)
    dtypes = {is_adapter_param(n): {p.dtype} for n, p in module.model.named_parameters()}
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    moved = [n for n, p in module.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == 8  # every B left zero: fp32 updates were not rounded away
    exp_avg = next(iter(module.trainer.optimizers[0].state.values()))["exp_avg"]
    assert exp_avg.dtype == torch.float32


def test_checkpoint_holds_and_names_the_adapters_and_both_exports_merge_them(lora_fit, tmp_path, capsys):
    module, trainer, _ = lora_fit
    module.tokenizer_json = il.data.tokenizer.train_tokenizer_from_iterator(["a b c d e f"] * 4, 300).to_str()
    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=False)
    assert raw["illada"]["lora"] == asdict(LoraConfig(rank=4, alpha=8.0))
    adapters = [k for k in raw["state_dict"] if is_adapter_param(k)]
    assert "model.blocks.1.mlp.down.lora_B.default.weight" in adapters and len(adapters) == 16
    assert "model.blocks.1.mlp.down.base_layer.weight" in raw["state_dict"]
    adapted = logits(module.model)
    loaded, _ = il.load_checkpoint(path)  # merged on load: a plain model
    assert not any(is_adapter_param(n) for n in loaded.state_dict())
    torch.testing.assert_close(logits(loaded), adapted, rtol=1e-5, atol=1e-5)
    for fmt, extra in (("pt", []), ("hf", ["dtype=float32"])):
        assert export_main([f"ckpt={path}", f"format={fmt}", f"out={tmp_path / fmt}", *extra]) == 0
        exported, tokenizer = il.load_checkpoint(tmp_path / fmt)
        assert tokenizer is not None
        torch.testing.assert_close(logits(exported), adapted, rtol=1e-5, atol=1e-5)
    assert export_main([f"ckpt={path}", "format=pt", f"out={tmp_path / 'pt'}"]) == 2  # no silent overwrite
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_bf16_true_lora_on_a_gpu_keeps_fp32_adapters_and_merges_to_the_adapted_logits(strategy, tmp_path):
    module, trainer, _ = fit(LoraConfig(rank=4), precision="bf16-true", steps=3, accelerator="gpu", strategy=strategy)
    params = dict(module.model.named_parameters())
    assert {p.dtype for n, p in params.items() if is_adapter_param(n)} == {torch.float32}
    assert {p.dtype for n, p in params.items() if not is_adapter_param(n)} == {torch.bfloat16}
    assert all(p.abs().max() > 0 for n, p in params.items() if "lora_B" in n)
    trainer.save_checkpoint(tmp_path / "gpu.ckpt")
    with torch.no_grad():
        # through the shards under fsdp (still on the GPU); Lightning's teardown moved the plain model to the CPU
        device = next(module.model.parameters()).device
        adapted = module.model.eval()(probe().to(device)).float().cpu()
    merged, _ = il.load_checkpoint(tmp_path / "gpu.ckpt")  # a sharded directory under fsdp
    torch.testing.assert_close(logits(merged.float()), adapted, rtol=0.05, atol=0.05)  # bf16 merged weights
