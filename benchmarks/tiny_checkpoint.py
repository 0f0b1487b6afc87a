"""A tiny random checkpoint with a tokenizer (`model.pt`), for CPU dry runs of the `--ckpt` benchmark paths.

    python -m benchmarks.tiny_checkpoint /tmp/tiny_ckpt/model.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from illada_lightning import build_model
from illada_lightning.checkpoint import export_model
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator

TEXT = ("Mia has 10 coins and buys 4 more. How many coins does Mia have? 14. What is 92 + 90? 182. "
        "The Sun heats water and it evaporates. Janet sells ducks at the market every day. ") * 40


def make_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = train_tokenizer_from_iterator([TEXT], 320)
    model = build_model("tiny", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=512,
                        max_seq_len=512)
    return export_model(Path(path), model.config, model.state_dict(), tokenizer.backend.to_str())


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    path = make_tiny_checkpoint(p.parse_args(argv).path)
    print(path)
    return path


if __name__ == "__main__":
    main()
