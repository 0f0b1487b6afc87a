"""LLaDA weight names <-> ours, and sharded safetensors read lazily (memory-mapped) or written with an index.

The released checkpoints (`LLaDAModelLM`, base_model_prefix `model`) name their weights
`model.transformer.{wte, ln_f, ff_out}.weight` and, per block N, `model.transformer.blocks.N.{attn_norm,
q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}.weight`. Our model fuses q|k|v into
`attn.qkv` and the SwiGLU gate|up into `mlp.gate_up` (gate = `ff_proj`, the one that goes through SiLU), so a
fused weight is the released ones concatenated along the output dimension, in that order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import ModelConfig
from . import HFCheckpointError

PREFIX = "model.transformer."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# (our name inside block N, the released names it is made of, concatenated along dim 0)
BLOCK_NAMES = (
    ("attn_norm.weight", ("attn_norm.weight",)),
    ("attn.qkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
    ("attn.out.weight", ("attn_out.weight",)),
    ("mlp_norm.weight", ("ff_norm.weight",)),
    ("mlp.gate_up.weight", ("ff_proj.weight", "up_proj.weight")),
    ("mlp.down.weight", ("ff_out.weight",)),
)


def name_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the released names it is made of."""
    names = {"embed.weight": (PREFIX + "wte.weight",), "norm.weight": (PREFIX + "ln_f.weight",)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (PREFIX + "ff_out.weight",)
    for i in range(cfg.n_layers):
        for ours, theirs in BLOCK_NAMES:
            names[f"blocks.{i}.{ours}"] = tuple(f"{PREFIX}blocks.{i}.{t}" for t in theirs)
    return names


def released_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every released weight for `cfg` (what a checkpoint must hold)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    block = {"attn_norm.weight": (d,), "q_proj.weight": (cfg.n_heads * hd, d),
             "k_proj.weight": (cfg.n_kv_heads * hd, d), "v_proj.weight": (cfg.n_kv_heads * hd, d),
             "attn_out.weight": (d, cfg.n_heads * hd), "ff_norm.weight": (d,), "ff_proj.weight": (f, d),
             "up_proj.weight": (f, d), "ff_out.weight": (d, f)}
    shapes = {PREFIX + "wte.weight": (cfg.vocab_size, d), PREFIX + "ln_f.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes[PREFIX + "ff_out.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        shapes.update({f"{PREFIX}blocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def split_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> released names (fused weights split back into their parts)."""
    shapes = released_shapes(cfg)
    out = {}
    for ours, theirs in name_map(cfg).items():
        rows = [shapes[t][0] for t in theirs]
        for name, part in zip(theirs, state[ours].split(rows, dim=0)):
            out[name] = part
    return out


class SafetensorsShards:
    """The tensors of a checkpoint directory's safetensors files, read one at a time from memory-mapped files."""

    def __init__(self, directory: str | Path):
        self._safe_open = safe_open
        self.directory = Path(directory)
        self.weight_map = self._read_weight_map()
        self._open: dict[str, object] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise HFCheckpointError(f"{index}: not a safetensors index ({exc})") from None
        elif (self.directory / SINGLE_FILE).is_file():
            with self._safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise HFCheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
        for key, file in weight_map.items():
            if not (self.directory / file).is_file():
                raise HFCheckpointError(f"{self.directory / file}: shard file is missing (it holds {key!r}, "
                                        f"listed in {INDEX_FILE})")
        return weight_map

    def _handle(self, file: str, device: str):
        if (file, device) not in self._open:
            self._open[(file, device)] = self._safe_open(str(self.directory / file), framework="pt", device=device)
        return self._open[(file, device)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[key], "cpu").get_slice(key).get_shape())

    def get(self, key: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        # A CUDA target is read straight onto the GPU; on the host only this one tensor is materialised.
        device = torch.device(device)
        where = "cpu"
        if device.type == "cuda":
            where = f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
        tensor = self._handle(self.weight_map[key], where).get_tensor(key)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def dtype(self) -> torch.dtype:
        first = next(iter(self.weight_map))
        return self._handle(self.weight_map[first], "cpu").get_tensor(first).dtype


def check_weights(shards: SafetensorsShards, cfg: ModelConfig) -> None:
    """Refuse missing, unexpected or mis-shaped weights before anything is loaded, naming file and key."""
    expected = released_shapes(cfg)
    where = shards.directory / (INDEX_FILE if (shards.directory / INDEX_FILE).is_file() else SINGLE_FILE)
    missing = [k for k in expected if k not in shards.weight_map]
    unexpected = [k for k in shards.weight_map if k not in expected]
    if missing or unexpected:
        raise HFCheckpointError(f"{where}: weights do not match config.json (missing {missing[:4]}, "
                                f"unexpected {unexpected[:4]})")
    for key, shape in expected.items():
        found = shards.shape(key)
        if found != shape:
            raise HFCheckpointError(f"{shards.directory / shards.weight_map[key]}: {key!r} has shape {found}, "
                                    f"config.json implies {shape}")


def iter_state(shards: SafetensorsShards, cfg: ModelConfig, device, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor on `device` in `dtype`), one parameter at a time."""
    for ours, theirs in name_map(cfg).items():
        parts = [shards.get(k, device, dtype) for k in theirs]
        yield ours, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> Path:
    """`model-0000i-of-0000n.safetensors` files of at most `max_shard_bytes` (one tensor may exceed it) and
    `model.safetensors.index.json`, as `transformers`' `save_pretrained` writes them."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].detach().contiguous().cpu() for k in keys}, str(directory / file),
                  metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = directory / INDEX_FILE
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return index
