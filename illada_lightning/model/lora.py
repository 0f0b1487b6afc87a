"""LoRA adapters on the mask predictor through Hugging Face `peft` (settings: model/lora_config.py).

`add_adapters` injects peft's LoRA layers in place (`peft.functional.inject_adapter_in_model`), so the model
stays a `MaskPredictor`: `hidden_states`, `output_weight`, per-block activation checkpointing and compile,
and FSDP2's per-block sharding (the adapters live inside the blocks, so they are sharded with them) work as
they are. Only the adapted projections' parameter names change, predictably:

    blocks.N.attn.qkv.weight  ->  blocks.N.attn.qkv.base_layer.weight          (frozen)
                                  blocks.N.attn.qkv.lora_A.default.weight      [rank, in]  (trained)
                                  blocks.N.attn.qkv.lora_B.default.weight      [out, rank] (trained, starts at 0)

Everything else (embedding, norms, LM head) is frozen. `merge_adapters` turns such a state dict back into
the base names with W + (alpha / rank) B A (peft's `merge_and_unload`): exports, `load_checkpoint` and
`init_from` see a plain model. `check_targets` refuses, before training, target names that match nothing,
that match a module an adapter would be silently ignored on, or that adapt some blocks and not others.
peft is imported on first use (it brings transformers with it: seconds).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn as nn

from .config import ModelConfig
from .lora_config import DEFAULT_TARGETS, LoraConfig
from .transformer import MaskPredictor

ADAPTER_NAME = "default"
_SETTINGS_ATTR = "illada_lora"  # set on an adapted model: its LoraConfig
_IN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LoraError(ValueError):
    """LoRA targets or adapter weights that do not fit the model, with the names that did and did not match."""


def is_adapter_param(name: str) -> bool:
    """A peft adapter tensor (`...lora_A.default.weight`, `...lora_B.default.weight`)."""
    return ".lora_" in name


def _need_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError("LoRA (sft.lora.rank > 0, or reading a LoRA checkpoint) needs Hugging Face peft: "
                        "pip install 'illada-lightning[lora]'") from None


def _peft_config(cfg: LoraConfig):
    _need_peft()
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), bias="none")


def _matching(target: str, names) -> set[str]:
    """The names `target` matches by peft's own rule for a list entry (the name, or ending with `.<target>`)."""
    _need_peft()
    from peft.tuners.tuners_utils import check_target_module_exists

    single = _peft_config(LoraConfig(rank=1, targets=[target]))
    return {n for n in names if n and check_target_module_exists(single, n)}


def _examples(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def check_targets(model: nn.Module, cfg: LoraConfig, where: str = "sft.lora.targets") -> list[str]:
    """The full names of the modules `cfg.targets` adapt; refuses a target that matches no module, one that
    matches something other than a Linear projection inside a block (the LM head and the embedding are read
    as weights, not called, so an adapter there would never act), and projections adapted in some blocks
    but not in others."""
    modules = dict(model.named_modules())
    n_layers = len(model.blocks)
    adaptable = {n for n, m in modules.items() if _IN_BLOCK.match(n) and type(m) is nn.Linear}
    hits: set[str] = set()
    for target in cfg.targets:
        found = _matching(target, modules)
        if not found:
            raise LoraError(f"{where}: {target!r} matches no module of the model; the block projections are "
                            f"{', '.join(DEFAULT_TARGETS)} (in each of blocks.0 .. blocks.{n_layers - 1})")
        wrong = found - adaptable
        if wrong:
            raise LoraError(f"{where}: {target!r} matches {_examples(wrong)}: not a Linear projection inside a "
                            "Transformer block (the LM head and embedding are read as weights, an adapter there "
                            f"would never act); adaptable: {', '.join(DEFAULT_TARGETS)}")
        hits |= found
    layers: dict[str, set[int]] = {}
    for name in hits:
        index, rel = _IN_BLOCK.match(name).groups()
        layers.setdefault(rel, set()).add(int(index))
    for rel, got in sorted(layers.items()):
        missing = sorted(set(range(n_layers)) - got)
        if missing:
            raise LoraError(
                f"{where}: {cfg.targets} adapt {rel} in {len(got)} of {n_layers} blocks (matched: "
                f"{_examples(f'blocks.{i}.{rel}' for i in got)}; not matched: "
                f"{_examples(f'blocks.{i}.{rel}' for i in missing)}); adapt a projection in every block or none")
    return sorted(hits)


def adapter_settings(model: nn.Module) -> LoraConfig | None:
    """The LoRA settings of a model with adapters (None: a plain model)."""
    return getattr(model, _SETTINGS_ATTR, None)


def add_adapters(model: MaskPredictor, cfg: LoraConfig, seed: int = 0) -> MaskPredictor:
    """Inject LoRA adapters in place (a no-op for rank 0 or a model that has them already) and freeze the
    rest. The adapters are drawn from `seed` (not the global RNG, which stays untouched), so every rank of a
    sharded run starts from the same ones, and kept in float32 whatever the base dtype (peft's
    autocast_adapter_dtype)."""
    if not cfg.enabled or adapter_settings(model) is not None:
        return model
    check_targets(model, cfg)
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    meta = any(p.is_meta for p in model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(_peft_config(cfg), model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=meta)
    cast_adapter_dtype(model, ADAPTER_NAME)
    setattr(model, _SETTINGS_ATTR, replace(cfg, targets=list(cfg.targets)))
    return model


def to_storage_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)`; but a module holding adapters casts only its frozen parameters, so the trainable
    adapters and their AdamW state stay float32 (bf16 master weights round small updates away)."""
    if not any(is_adapter_param(n) for n, _ in module.named_parameters()):
        return module.to(dtype)
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (a sharded parameter counts its full size)."""
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def adapted_parameter_counts(model_config: ModelConfig, cfg: LoraConfig) -> dict[str, int]:
    """`parameter_counts` of the model with these adapters, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MaskPredictor(model_config)
    return parameter_counts(add_adapters(model, cfg))


def base_layout(state: dict) -> dict:
    """An adapted state dict's base names and shapes, adapters dropped (no arithmetic: shape checks only)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_adapter_param(k)}


def merge_adapters(state: dict[str, torch.Tensor], model_config: ModelConfig, cfg: LoraConfig) -> dict:
    """The base-named state dict with every adapter merged into its weight, W + (alpha / rank) B A, by peft's
    `merge_and_unload` (safe merge: the inputs are never modified, and a non-finite result is refused).
    A state without adapter tensors is returned as it is."""
    if not any(is_adapter_param(k) for k in state):
        return state
    _need_peft()
    from peft import LoraModel

    with torch.device("meta"):
        base = MaskPredictor(model_config)
    tuner = LoraModel(base, _peft_config(cfg), ADAPTER_NAME, low_cpu_mem_usage=True)
    missing, unexpected = base.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise LoraError(f"the adapter weights do not fit rank={cfg.rank} targets={list(cfg.targets)}: missing "
                        f"{_examples(missing)}; unexpected {_examples(unexpected)}")
    try:
        merged = tuner.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft's NaN check
        raise LoraError(f"merging the adapters: {exc}") from None
    return dict(merged.state_dict())
