"""The files a training run reads, checked before torch loads: the CLI answers a missing checkpoint, tokenizer or
data file at once instead of after seconds of imports. `preflight` checks them again, with everything else, for
library callers."""

from __future__ import annotations

from pathlib import Path

from ..data.corpus import DataFileError, check_data_file, resolve_data_path


def missing_input(cfg) -> str | None:
    """The first input of `cfg` (a `TrainingConfig`) that is not on disk, as one error line; None when all are:
    `init_from`, `tokenizer.path`, and the data files of every stage it runs (files only: prepared corpora,
    hub data sets and streams are checked by preflight)."""
    if cfg.init_from and not Path(cfg.init_from).expanduser().exists():
        return f"init_from={cfg.init_from}: no such file or directory"
    if cfg.tokenizer.path and not resolve_data_path(cfg.tokenizer.path).exists():
        return f"tokenizer.path={cfg.tokenizer.path}: no such file or directory"
    data = {}
    if cfg.stage in ("pretrain", "all") and cfg.pretrain.data.hub_name is None:
        data["pretrain.data.train_files"] = [] if cfg.pretrain.data.train_corpus else cfg.pretrain.data.train_files
        data["pretrain.data.val_files"] = [] if cfg.pretrain.data.val_corpus else cfg.pretrain.data.val_files
    if cfg.stage in ("sft", "all"):
        data["sft.data.train_files"], data["sft.data.val_files"] = cfg.sft.data.train_files, cfg.sft.data.val_files
    for key, files in data.items():
        for name in files:
            try:
                check_data_file(name)
            except DataFileError as exc:
                return f"{key}: {exc}"
    return None
