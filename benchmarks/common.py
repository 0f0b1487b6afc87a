"""What the benchmark scripts share: device facts, timing, precision, preset defaults and the JSON-line output.

Importable without mlflow/optuna/omegaconf (the GPU machine lacks them)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from illada_lightning.provenance import git_commit


def environment(device: torch.device) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "commit": git_commit()}


def fast_rows(args, random_rows, task_rows) -> list[dict]:
    """The rows of a `--fast` benchmark: `random_rows` on random inputs (unless --skip-random), then `task_rows` on
    `--task` with the trained `--ckpt`; each gets (args, model, [tokenizer,] name, device)."""
    device = torch.device(args.device)
    model, tokenizer, name = fast_model(args, device)
    rows = [] if args.skip_random else random_rows(args, model, name, device)
    if args.task:
        rows += task_rows(args, model, tokenizer, name, device)
    return rows


def fast_model(args, device):
    """(model, tokenizer, name) of the fast-decoding benchmarks: the trained `--ckpt` or random `--preset` weights,
    in the timing dtype (`--dtype`)."""
    import illada_lightning as il

    if args.ckpt:
        model, tokenizer = il.load_checkpoint(args.ckpt, device=device)
        name = f"{model.config.name} ({args.ckpt})"
    else:
        model, tokenizer, name = il.build_model(args.preset, device=device, init_std=args.init_std), None, args.preset
    if args.dtype == "bf16" and device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model.eval(), tokenizer, name


def timed(fn, device: torch.device) -> tuple[object, float]:
    """(result, seconds), synchronising the device around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def precision_scope(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def set_exact_fp32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on


def fill_preset_defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Options left unset take the preset's defaults; timing precision bf16 on CUDA, fp32 elsewhere."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def emit(row: dict, out: str | None) -> None:
    """Print the row as one JSON line and append it to `out` when given."""
    line = json.dumps(row)
    print(line)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
