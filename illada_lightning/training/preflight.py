"""Preflight: everything that can be wrong is checked before any training step.

The strategy on this machine, LoRA targets, the run directory (a finished or interrupted run is never overwritten
silently; it must be writable and have room for a checkpoint), the MLflow store (a SQLite file in an
existing directory, a reachable server), `init_from`, the tokenizer against the model, every data set of
every requested stage (read, tokenised, packed), and an SFT set whose every example is longer than
`max_seq_len`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from ..checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    check_compatible,
    checkpoint_tokenizer,
    read_finished,
    read_model_layout,
)
from ..config import ConfigError
from ..data.checkpoint_tokenizer import load_tokenizer
from ..data.config import SFTDataConfig
from ..data.datamodule import PretrainDataModule, SFTDataModule
from ..data.sft import load_sft_examples
from ..data.tokenizer import TOKENIZER_FILE, build_tokenizer, check_tokenizer_compatible
from ..model.build import build_model
from .config import TrainingConfig
from .float8 import check_float8
from .lora import check_lora
from .strategy import check_strategy
from .tracking import check_tracking_uri

log = logging.getLogger(__name__)

# fp32 weights + AdamW's two fp32 moments: what one step checkpoint holds per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12


class RunDirectoryError(ValueError):
    """The run directory already holds a run that this invocation would overwrite."""


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def stages_of(cfg: TrainingConfig) -> list[str]:
    return ["pretrain", "sft"] if cfg.stage == "all" else [cfg.stage]


def check_run_dir(cfg: TrainingConfig) -> None:
    """Refuse to write over a finished or interrupted stage unless `resume=auto`."""
    if cfg.resume == "auto":
        return
    run_dir = Path(cfg.resolved_run_dir)
    for stage in stages_of(cfg):
        stage_dir = run_dir / stage
        if read_finished(stage_dir) is not None:
            raise RunDirectoryError(
                f"{stage_dir} already holds a finished {stage} run; pass resume=auto to reuse it "
                f"(finished stages are skipped), or choose a new name=... or run_dir=...")
        ckpt_dir = stage_dir / "checkpoints"
        ckpts = list(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        if ckpts:
            raise RunDirectoryError(
                f"{stage_dir} holds an interrupted {stage} run ({len(ckpts)} checkpoint(s)); pass resume=auto "
                f"to continue it, or choose a new name=... or run_dir=...")


def sft_init_path(cfg: TrainingConfig) -> str | None:
    """Where SFT's initial weights come from when stage=sft: init_from, else this run's own pretraining."""
    if cfg.init_from:
        return cfg.init_from
    own = Path(cfg.resolved_run_dir) / "pretrain"
    return str(own) if (own / "model.pt").is_file() else None


def init_path(cfg: TrainingConfig) -> str | None:
    """The checkpoint the first stage starts from: init_from (SFT or continued pretraining), or for stage=sft
    this run's own pretraining; None when training starts from random weights (stage=all chains its own)."""
    if cfg.stage == "sft":
        return sft_init_path(cfg)
    return cfg.init_from if cfg.stage == "pretrain" else None


def resolve_tokenizer(cfg: TrainingConfig):
    """The run's tokenizer: the run directory's own (resume), the init checkpoint's (SFT, continued
    pretraining: a released checkpoint's brings its own special ids and chat template), or built from the
    config (loaded from tokenizer.path, or trained on the pretraining corpus and cached)."""
    own = Path(cfg.resolved_run_dir) / TOKENIZER_DIR
    tokenizer = None
    # a fresh run builds its tokenizer from the config, or takes the one of the checkpoint it starts from
    continuing = cfg.resume == "auto" or cfg.stage == "sft" or bool(cfg.init_from)
    if (own / TOKENIZER_FILE).is_file() and continuing:
        tokenizer = load_tokenizer(own)
    elif init_path(cfg):
        try:
            tokenizer = checkpoint_tokenizer(init_path(cfg))
        except CheckpointError as exc:
            raise CheckpointError(f"init_from: {exc}") from None
        if tokenizer is not None and cfg.tokenizer.path:
            log.warning("tokenizer.path=%s is not used: the run continues with the tokenizer of %s", cfg.tokenizer.path,
                        init_path(cfg))
    if tokenizer is None and not is_rank_zero() and not cfg.tokenizer.path:
        # Launched by torchrun/SLURM, every rank starts at once: rank 0 trains the tokenizer, the others
        # wait for the file instead of racing it on the shared cache.
        tokenizer = load_tokenizer(_wait_for(own / TOKENIZER_FILE).parent)
    if tokenizer is None:
        data = cfg.pretrain.data
        tokenizer = build_tokenizer(cfg.tokenizer, data.train_files, fmt=data.format, text_field=data.text_field,
                                    cache_dir=data.cache_dir)
    try:
        check_tokenizer_compatible(tokenizer, cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{exc} (set tokenizer.vocab_size <= model.vocab_size or pick a matching model)") from None
    return tokenizer


def _wait_for(path: Path, timeout_s: float = 3600.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_zero_only.rank}: {path} did not appear within {timeout_s:.0f}s")
        time.sleep(2.0)
    return path


def check_sft_lengths(sft_cfg: SFTDataConfig, tokenizer, max_seq_len: int) -> None:
    """An SFT set whose every example (prompt + response + EOS) exceeds max_seq_len is a config error."""
    split = sft_cfg.multi_turn_split and sft_cfg.masking == "response_only"
    examples = load_sft_examples(sft_cfg.train_files, tokenizer, multi_turn_split=split, cache_dir=sft_cfg.cache_dir)
    lengths = [len(p) + len(r) + 1 for p, r in zip(examples.prompts, examples.responses)]
    if lengths and min(lengths) > max_seq_len:
        raise ConfigError(
            f"every one of the {len(lengths)} SFT examples in {list(sft_cfg.train_files)} is longer than "
            f"max_seq_len={max_seq_len} (shortest: {min(lengths)} tokens with prompt, response and EOS); "
            "raise sft.data.max_seq_len / model.max_seq_len or use shorter examples")


def make_datamodule(cfg: TrainingConfig, stage: str, tokenizer):
    if stage == "pretrain":
        return PretrainDataModule(cfg.pretrain.data, tokenizer, cfg.model.max_seq_len, cfg.pretrain.batch_size,
                                  cfg.seed)
    return SFTDataModule(cfg.sft.data, tokenizer, cfg.model.max_seq_len, cfg.sft.batch_size, cfg.seed)


def stage_max_seq_len(cfg: TrainingConfig, stage: str) -> int:
    data = cfg.pretrain.data if stage == "pretrain" else cfg.sft.data
    n = data.max_seq_len or cfg.model.max_seq_len
    if n > cfg.model.max_seq_len:
        raise ConfigError(f"{'pretrain' if stage == 'pretrain' else 'sft'}.data.max_seq_len={n} exceeds "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    return n


def check_init_from(cfg: TrainingConfig) -> None:
    """init_from (stage=sft or stage=pretrain): the checkpoint exists and fits the configured model."""
    if not cfg.init_from:
        return
    p = Path(cfg.init_from).expanduser()
    if not p.exists():
        raise CheckpointError(f"init_from={cfg.init_from}: no such file or directory")
    ckpt_cfg, state = read_model_layout(p)
    check_compatible(ckpt_cfg, cfg.model, state, build_model(cfg.model, device="meta"), cfg.init_from)


def check_run_dir_writable(cfg: TrainingConfig) -> None:
    """The run directory can be created and written, and has room for one step checkpoint."""
    run_dir = Path(cfg.resolved_run_dir)
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(run_dir).free
    except OSError as exc:
        raise RunDirectoryError(f"run directory {run_dir} is not writable: {exc.strerror or exc}") from None
    params = sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())
    need = params * CHECKPOINT_BYTES_PER_PARAM
    if free < need:
        raise RunDirectoryError(f"run directory {run_dir} has {free / 2**20:.0f} MiB free, but one checkpoint of "
                                f"this model needs about {need / 2**20:.0f} MiB (weights and AdamW state)")
    keep = max(cfg.pretrain.ckpt_keep, cfg.sft.ckpt_keep) + 1  # the kept ones and the one being written
    if free < keep * need:
        log.warning("run directory %s has %.0f MiB free; %d checkpoints of this model need about %.0f MiB",
                    run_dir, free / 2**20, keep, keep * need / 2**20)


def preflight(cfg: TrainingConfig) -> tuple[Any, dict[str, Any]]:
    """All checks that can fail, before training; returns (tokenizer, {stage: prepared datamodule})."""
    check_strategy(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes, precision=cfg.precision,
                   cpu_offload=cfg.fsdp_cpu_offload)
    if cfg.float8:
        check_float8(cfg.accelerator)
    check_init_from(cfg)  # what the user named first, then the machine (disk, store)
    check_lora(cfg)
    if is_rank_zero():
        check_run_dir(cfg)
        check_tracking_uri(cfg.mlflow, cfg.runs_root)
        check_run_dir_writable(cfg)
    tokenizer = resolve_tokenizer(cfg)
    datamodules = {}
    for stage in stages_of(cfg):
        n = stage_max_seq_len(cfg, stage)
        if stage == "sft":
            check_sft_lengths(cfg.sft.data, tokenizer, n)
        dm = make_datamodule(cfg, stage, tokenizer)
        dm.setup("fit")  # reads, tokenises and packs now, so data errors come before training
        datamodules[stage] = dm
    if is_rank_zero():
        tokenizer.save(Path(cfg.resolved_run_dir) / TOKENIZER_DIR)  # next to the checkpoints; other ranks may wait
    return tokenizer, datamodules
