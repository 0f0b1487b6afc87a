"""Saving and loading what training produces: models, run directories, exports.

Run directory layout (`run_experiment`):

    <run_dir>/config.yaml                  the resolved experiment config
    <run_dir>/tokenizer/tokenizer.json     the run's tokenizer (+ tokenizer_config.json with its special tokens
                                           and chat template when they are a checkpoint's, not ids 0..8)
    <run_dir>/mlflow_runs.json             MLflow parent/child run ids (resume continues the same runs)
    <run_dir>/<stage>/checkpoints/         Lightning checkpoints: the newest `ckpt_keep` step=NNNNNNN.ckpt,
                                           last.ckpt linking to the newest (a directory per checkpoint
                                           under strategy=fsdp: sharded, complete once `.metadata` exists)
    <run_dir>/<stage>/model.pt             exported final weights + model config + tokenizer (one file)
    <run_dir>/<stage>/FINISHED             written when the stage completed (json summary)

`load_checkpoint(path)` accepts a run directory, a stage directory, an exported `model.pt`, a Lightning
`.ckpt` file or a sharded FSDP2 checkpoint directory (complete once DCP's `.metadata` exists; read on one
process, whatever the world size that wrote it), and returns `(model, tokenizer)`; the model config
is read from the checkpoint itself.

Crash safety: every file is written to a temporary name in the same directory, fsynced and renamed
(`atomic_write`), so a checkpoint name never holds a partial file; `checkpoint_problem` is the one test of
"complete and loadable" (files and sharded directories alike); `find_resume_checkpoint` scans the step
checkpoints newest-first instead of trusting the `last.ckpt` link.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.fsdp import FSDPModule

from ..data.checkpoint_tokenizer import load_tokenizer, tokenizer_from_str
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer
from ..interop import HFCheckpointError
from ..interop.llada_hf import (
    copy_hf_weights,
    is_hf_checkpoint,
    load_hf_checkpoint,
    read_hf_checkpoint,
    read_hf_layout,
    read_hf_tokenizer,
)
from ..model.config import ModelConfig
from ..model.lora import LoraError, adapter_settings, base_layout, is_adapter_param, merge_adapters
from ..model.lora_config import LoraConfig
from ..model.transformer import MaskPredictor
from .files import (  # noqa: F401  (re-exported: one place to ask "is this checkpoint usable?")
    CheckpointError,
    atomic_write,
    checkpoint_problem,
    find_resume_checkpoint,
    link_last,
    prune_step_checkpoints,
    remove_partial_writes,
    step_checkpoints,
    step_of,
)

EXPORT_FILE = "model.pt"
FINISHED_FILE = "FINISHED"
TOKENIZER_DIR = "tokenizer"
STAGE_ORDER = ("sft", "pretrain")  # a run directory's most trained model comes first


def _from_hf(read, *args):
    """A Hugging Face (released LLaDA) checkpoint directory, read by interop/llada_hf.py."""
    try:
        return read(*args)
    except HFCheckpointError as exc:
        raise CheckpointError(str(exc)) from None


# ----------------------------------------------------------------------------- reading


def _is_sharded_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _read_sharded(path: Path) -> dict:
    """The weights (not the optimizer state) of a sharded checkpoint directory, consolidated on CPU without
    any process group, plus Lightning's `meta.pt` (hyper-parameters, our "illada" entry). Works for any
    number of shard files: DCP's metadata says which file holds which piece."""
    reader = FileSystemReader(str(path))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.split(".")[0] in ("state_dict", "model")}
    raw: dict = {}
    _load_state_dict(raw, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    if (path / "meta.pt").is_file():
        raw.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=False))
    return raw


def _read_raw(path: Path) -> dict:
    if _is_sharded_dir(path):
        try:
            return _read_sharded(path)
        except Exception as exc:  # a shard file missing or truncated
            raise CheckpointError(f"cannot read sharded checkpoint {path}: {exc}") from None
    try:
        # mmap: tensors are read when touched, so the shape checks of init_from cost no full read.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The file (or sharded directory) holding the weights that `path` names."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if p.is_file() or _is_sharded_dir(p):
        return p
    candidates = [p / EXPORT_FILE, p / "checkpoints" / "last.ckpt", *step_checkpoints(p / "checkpoints")[:1]]
    for stage in STAGE_ORDER:
        candidates += [p / stage / EXPORT_FILE, p / stage / "checkpoints" / "last.ckpt",
                       *step_checkpoints(p / stage / "checkpoints")[:1]]
    for c in candidates:
        if c.is_file() or _is_sharded_dir(c):
            return c
    raise CheckpointError(
        f"no checkpoint found in {p}: expected {EXPORT_FILE} or checkpoints/last.ckpt there or in its "
        f"{'/'.join(STAGE_ORDER)} subdirectories"
    )


def _model_config(raw: dict, path: Path) -> ModelConfig:
    cfg = (raw.get("illada") or {}).get("model_config") or raw.get("model_config")
    if cfg is None:
        cfg = (raw.get("hyper_parameters") or {}).get("model_config")
    if cfg is None:
        raise CheckpointError(f"{path} holds no model config: not a checkpoint written by illada-lightning training")
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in cfg.items() if k in known}).validate()


def _model_state(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    state = raw.get("state_dict", raw.get("model"))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no model weights")
    prefix = "model."  # Lightning checkpoints name weights after the module attribute
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _merged(state: dict, raw: dict, cfg: ModelConfig, path: Path, merge: bool) -> dict:
    """A LoRA checkpoint's state with its adapters merged into the base names (`merge=False`: the base names
    and shapes only, for shape checks); any other state as it is."""
    lora = (raw.get("illada") or {}).get("lora")
    adapters = any(is_adapter_param(k) for k in state)
    if adapters and not lora:
        raise CheckpointError(f"{path} holds LoRA adapter weights but no LoRA settings (illada.lora)")
    if not adapters:
        return state
    if not merge:
        return base_layout(state)
    try:
        return merge_adapters(state, cfg, LoraConfig(**lora))
    except LoraError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_model_checkpoint(path: str | Path, merge: bool = True
                          ) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None, Path]:
    """(model config, model state dict, tokenizer json or None, resolved path) of any supported checkpoint.
    A LoRA SFT checkpoint's adapters are merged into the base weights (model/lora.py): the state of a plain
    model."""
    if is_hf_checkpoint(path):
        return _from_hf(read_hf_checkpoint, path)
    resolved = resolve_checkpoint(path)
    raw = _read_raw(resolved)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{resolved} is not an illada-lightning checkpoint (got {type(raw).__name__})")
    cfg = _model_config(raw, resolved)
    tokenizer_json = (raw.get("illada") or {}).get("tokenizer_json") or raw.get("tokenizer_json")
    return cfg, _merged(_model_state(raw, resolved), raw, cfg, resolved, merge), tokenizer_json, resolved


def _find_tokenizer_near(path: Path) -> Tokenizer | None:
    for parent in [path, *path.parents][:5]:
        candidate = parent / TOKENIZER_DIR / TOKENIZER_FILE
        if candidate.is_file():
            return load_tokenizer(candidate.parent)
    return None


def checkpoint_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer stored with a checkpoint (embedded, or a Hugging Face directory's own files, with its
    special ids and chat template), without loading the weights; None if it has none."""
    if is_hf_checkpoint(path):
        return _from_hf(read_hf_tokenizer, path)
    _, _, tokenizer_json, _ = read_model_checkpoint(path)
    return tokenizer_from_str(tokenizer_json) if tokenizer_json else None


def load_checkpoint(path: str | Path, device: str | torch.device | None = None):
    """`(model, tokenizer)` from a run directory or checkpoint file saved by training (model in eval mode).

    The tokenizer is the one embedded in the checkpoint, else `tokenizer/` of the run directory; None if
    neither exists. A Hugging Face checkpoint directory (config.json + safetensors) loads through
    interop/llada_hf.py: bf16 on GPU, its tokenizer and special ids from the directory.
    """
    if is_hf_checkpoint(path):
        return _from_hf(load_hf_checkpoint, path, device)
    cfg, state, tokenizer_json, resolved = read_model_checkpoint(path)
    model = MaskPredictor(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{resolved}: weights do not match the stored model config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = tokenizer_from_str(tokenizer_json) if tokenizer_json else _find_tokenizer_near(resolved.parent)
    return model, tokenizer


# ----------------------------------------------------------------------------- init_from


# What must agree between init_from's model and the configured one: the shapes, and the values that change the
# computation without changing a shape (a released checkpoint's RoPE theta and RMSNorm epsilon).
MATCHING_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings",
                 "rope_theta", "norm_eps", "mask_token_id", "eos_token_id", "pad_token_id")


def check_compatible(cfg: ModelConfig, expected: ModelConfig, state: dict, model: torch.nn.Module, path) -> None:
    """Refuse a checkpoint whose vocabulary, special ids, RoPE/norm constants or parameter shapes differ from
    the configured model, naming them and the `model.*` overrides that make the config match."""
    problems = []
    if cfg.vocab_size != expected.vocab_size:
        problems.append(f"vocabulary: checkpoint vocab_size={cfg.vocab_size}, config model.vocab_size={expected.vocab_size}")
    for key in ("mask_token_id", "eos_token_id", "pad_token_id", "rope_theta", "norm_eps"):
        if getattr(cfg, key) != getattr(expected, key):
            problems.append(f"{key}: checkpoint {getattr(cfg, key)}, config {getattr(expected, key)}")
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
    if missing or unexpected:
        problems.append(f"parameter names differ (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if problems:
        fix = " ".join(f"model.{k}={getattr(cfg, k)}" for k in MATCHING_KEYS if getattr(cfg, k) != getattr(expected, k))
        raise CheckpointError(
            f"init_from={path} does not fit the configured model: " + " | ".join(problems)
            + f". The checkpoint's model is {cfg.name}; pass its architecture: {fix or '(same keys; see above)'}"
        )


def read_model_layout(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, state dict whose shapes can be checked) of a checkpoint, without reading its weights:
    memory-mapped for our files, a meta-device state for a Hugging Face directory."""
    if is_hf_checkpoint(path):
        return _from_hf(read_hf_layout, path)
    cfg, state, _, _ = read_model_checkpoint(path, merge=False)
    return cfg, state


def load_init_weights(model: torch.nn.Module, path: str | Path, expected: ModelConfig):
    """Copy pretrained weights into `model` (`init_from`: SFT, continued pretraining); returns the checkpoint's
    tokenizer json (None for a Hugging Face directory, whose tokenizer is its files) and the resolved path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"init_from={path}: no such file or directory")
    if is_hf_checkpoint(p):  # streamed tensor by tensor: no second full copy of a released 8B model
        cfg, state = read_model_layout(p)
        check_compatible(cfg, expected, state, model, path)
        _from_hf(copy_hf_weights, model, p)
        return None, p
    cfg, state, tokenizer_json, resolved = read_model_checkpoint(p)
    check_compatible(cfg, expected, state, model, path)
    model.load_state_dict(state)
    return tokenizer_json, resolved


# ----------------------------------------------------------------------------- writing


def full_model_state(trainer, module) -> dict[str, torch.Tensor] | None:
    """The unsharded model weights on CPU (rank 0; None elsewhere), LoRA adapters merged into the base names.
    A collective under FSDP2: every rank must call it; the shards are gathered to rank 0's host memory only
    (no full copy on other ranks)."""
    if isinstance(module.model, FSDPModule):
        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()} if trainer.is_global_zero else None
    if state is None or not trainer.is_global_zero:
        return None
    lora = adapter_settings(module.model)
    return state if lora is None else merge_adapters(state, module.model.config, lora)


def export_model(path: str | Path, model_config: ModelConfig, state: dict, tokenizer_json: str | None,
                 extra: dict | None = None) -> Path:
    """One self-contained inference file: weights, model config and tokenizer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_config": asdict(model_config), "state_dict": state, "tokenizer_json": tokenizer_json,
               **(extra or {})}
    return atomic_write(path, lambda f: torch.save(payload, f))


def write_finished(stage_dir: str | Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(Path(stage_dir) / FINISHED_FILE, lambda f: f.write(text.encode()))


def read_finished(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / FINISHED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def last_checkpoint(stage_dir: str | Path) -> Path | None:
    """`checkpoints/last.ckpt` of a stage if it points at something, else its newest step checkpoint."""
    p = Path(stage_dir) / "checkpoints" / "last.ckpt"
    if p.exists():
        return p
    steps = step_checkpoints(Path(stage_dir) / "checkpoints")
    return steps[0] if steps else None
