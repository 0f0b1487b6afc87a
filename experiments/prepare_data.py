"""Tokenise a corpus once into token shards on disk, for training runs that read it by window.

    python -m experiments.prepare_data out=corpora/train files=[data/corpus/train.txt] num_proc=2
    python -m experiments.prepare_data out=corpora/valid files=[data/corpus/valid.txt] \
        tokenizer.train_files=[data/corpus/train.txt]
    python -m experiments.run pretrain.data.train_corpus=corpora/train pretrain.data.val_corpus=corpora/valid
    python -m experiments.prepare_data out=corpora/fineweb hub_name=HuggingFaceFW/fineweb-edu tokenizer.path=tok/

The tokenizer is the one a run with the same `tokenizer.*` keys uses (`tokenizer.path`, or trained on
`tokenizer.train_files`, default `files`, and cached in `cache_dir`), so its fingerprint matches: a
validation set needs `tokenizer.train_files` = the training files (or `tokenizer.path`), and a run reading a
prepared corpus needs the tokenizer it was prepared with (a run with another one is refused). Running the
command again on the same inputs does nothing. The library call is `illada_lightning.data.prepare.prepare_corpus`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from illada_lightning.config import ConfigError, load_config
from illada_lightning.data.config import FORMATS, TEXT_UNITS, TokenizerConfig
from illada_lightning.data.corpus import DataFileError
from illada_lightning.data.prepare import prepare_corpus
from illada_lightning.data.prepared import DEFAULT_SHARD_TOKENS
from illada_lightning.data.tokenizer import build_tokenizer


@dataclass
class PrepareConfig:
    out: str = ""  # the corpus directory to write
    files: list[str] = field(default_factory=list)  # text / jsonl / parquet files, in order
    hub_name: str | None = None  # a `datasets` hub name, streamed; with files: a builder ("parquet") streaming them
    split: str = "train"  # hub split
    format: str = "auto"
    text_field: str = "text"
    text_unit: str = "auto"
    num_proc: int = 1  # tokenising processes (local files)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    cache_dir: str = ".cache/illada"  # where a trained tokenizer is cached (the training run's default)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> PrepareConfig:
        problems = [
            (not self.out, "out= is required (the corpus directory to write)"),
            (not self.files and self.hub_name is None, "give files=[...] or hub_name="),
            (self.format not in FORMATS, f"format: {self.format!r} is not one of {FORMATS}"),
            (self.text_unit not in TEXT_UNITS, f"text_unit: {self.text_unit!r} is not one of {TEXT_UNITS}"),
            (self.num_proc < 1, f"num_proc must be >= 1, got {self.num_proc}"),
            (self.shard_tokens < 1, f"shard_tokens must be >= 1, got {self.shard_tokens}"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)
        self.tokenizer.validate()
        return self


def main(argv: list[str]) -> dict:
    cfg = load_config(PrepareConfig, None, argv).validate()
    if cfg.hub_name is None:
        tokenizer = build_tokenizer(cfg.tokenizer, cfg.files, fmt=cfg.format, text_field=cfg.text_field,
                                    cache_dir=cfg.cache_dir)
    elif cfg.tokenizer.path:
        tokenizer = build_tokenizer(cfg.tokenizer, [], cache_dir=cfg.cache_dir)
    else:
        raise ValueError("a hub corpus needs tokenizer.path= (a tokenizer is trained on local files only)")
    hub = cfg.hub_name is not None
    manifest = prepare_corpus(cfg.out, tokenizer, files=[] if hub else cfg.files, hub_name=cfg.hub_name,
                              hub_data_files=cfg.files if hub else None, hub_split=cfg.split, fmt=cfg.format,
                              text_field=cfg.text_field, text_unit=cfg.text_unit, num_proc=cfg.num_proc,
                              shard_tokens=cfg.shard_tokens)
    print(f"{cfg.out}: {manifest['documents']} documents, {manifest['tokens']} tokens, "
          f"{len(manifest['shards'])} shards, {manifest['bytes']} bytes "
          f"(tokenizer {manifest['tokenizer_fingerprint'][:12]})")
    print(f"train with: pretrain.data.train_corpus={cfg.out}")
    return manifest


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataFileError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
