"""Activation checkpointing plans: which blocks, or which part of every block, recompute in backward.

`activation_checkpointing` (config key, and the module's argument) takes:
- `none` / `false`: nothing is recomputed;
- `full` / `true`: every Transformer block is recomputed and keeps only its input;
- `mlp`: only the SwiGLU of every block is recomputed (its 3 x ffn_dim-wide intermediates are the largest
  tensors a block saves); attention and its projections keep their activations;
- an integer N (0..n_layers): the first N blocks are recomputed, the others keep their activations - the knob
  between `none` (0) and `full` (n_layers): each block left out costs its activations (~1.3 GB per 8192-token
  row for `illada_8b` in bf16) and saves its share of the extra forward (full checkpointing costs 8/6 of the
  compute of a step without it).
Parameter names never change, so checkpoints are interchangeable with and without checkpointing.
`parse_checkpointing` needs no torch: the config validates the value before torch loads.
"""

from __future__ import annotations

import functools

MODES = ("none", "full", "mlp")
_ALIASES = {"false": "none", "true": "full", "0": "none", "": "none"}


def parse_checkpointing(value, n_layers: int) -> tuple[str, int]:
    """("blocks", N) or ("mlp", n_layers) or ("none", 0) from a config value (bool, int or string)."""
    text = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if text == "none":
        return "none", 0
    if text == "full":
        return "blocks", n_layers
    if text == "mlp":
        return "mlp", n_layers
    if text.isdigit():
        n = int(text)
        if n > n_layers:
            raise ValueError(f"activation_checkpointing={value}: the model has only {n_layers} blocks")
        return ("blocks", n) if n else ("none", 0)
    raise ValueError(f"activation_checkpointing must be none|full|mlp (or false|true), or a number of blocks "
                     f"0..{n_layers}; got {value!r}")


def _recompute(module) -> None:
    # imported here: the config parses this module's values without torch
    from torch.utils.checkpoint import checkpoint

    if getattr(module, "_checkpointed", False):
        return
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
    module._checkpointed = True


def enable_activation_checkpointing(model, value) -> str:
    """Apply the plan to a MaskPredictor in place; returns it as a short description ("none", "22/22 blocks",
    "mlp")."""
    mode, n = parse_checkpointing(value, len(model.blocks))
    for i, block in enumerate(model.blocks):
        if mode == "blocks" and i < n:
            _recompute(block)
        elif mode == "mlp":
            _recompute(block.mlp)
    return {"none": "none", "mlp": "mlp"}.get(mode, f"{n}/{len(model.blocks)} blocks")
