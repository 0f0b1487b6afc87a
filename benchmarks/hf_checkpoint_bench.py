"""A released-format (Hugging Face, LLaDA layout) checkpoint of a preset's shape: write, load, evaluate.

    python -m benchmarks.hf_checkpoint_bench --preset llada_8b --out benchmarks/results/hf_checkpoint_h200.jsonl
    python -m benchmarks.hf_checkpoint_bench --preset tiny --device cpu --items 8       # CPU smoke, seconds

1. A random model of the preset's shape is built in bf16 on the device and written with
   `interop.llada_hf.export_hf_checkpoint` (config.json, 5 GB safetensors shards + index, tokenizer).
2. In a fresh child process (so its peak memory is the load's alone) `load_checkpoint(DIR)` - the same call
   `experiments.evaluate ckpt=DIR` makes - is timed, with the host's peak RSS and the GPU's peak allocation;
   then the cloze task (`evaluation.evaluate`, what the CLI runs) is scored with each rule and timed.
One JSON line per rule: write_s, load_s, params_gb, host_peak_rss_gb (the child's, imports included),
gpu_peak_gb, items, items_per_s, acc (chance-level:
the weights are random). The text is WikiText-2 valid when /work/shared has it, else a seeded synthetic text.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.interop.llada_hf import export_hf_checkpoint
from illada_lightning.model.config import PRESETS, get_preset
from illada_lightning.model.transformer import MaskPredictor

from .common import emit, environment, timed

WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llada_8b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed after)")
    p.add_argument("--text", default=None, help="cloze corpus (default: WikiText-2 valid, else synthetic)")
    p.add_argument("--items", type=int, default=64, help="cloze items scored per rule")
    p.add_argument("--mc-samples", type=int, default=8, help="likelihood rule: Monte-Carlo samples per candidate")
    p.add_argument("--rules", nargs="+", default=["confidence", "likelihood"], choices=["confidence", "likelihood"])
    p.add_argument("--load-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: what load_checkpoint (experiments.evaluate) does - bf16 on GPU, float32 on CPU")
    p.add_argument("--phase", default="all", choices=["all", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--write-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="append one JSON line per rule to this file")
    return p.parse_args(argv)


def corpus_text(path: str | None) -> str:
    if path or WIKITEXT.is_file():
        return Path(path or WIKITEXT).read_text(encoding="utf-8")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(60))


def write_random_checkpoint(args, directory: Path) -> float:
    """A bf16 random model of the preset's shape on the device, exported; returns the seconds it took."""
    text = corpus_text(args.text)
    tokenizer = train_tokenizer_from_iterator([text], 2048)
    cfg = get_preset(args.preset, mask_token_id=tokenizer.mask_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id)
    device = torch.device(args.device)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of the model
    try:
        with device:
            model = MaskPredictor(cfg)
    finally:
        torch.set_default_dtype(previous)
    _, seconds = timed(lambda: export_hf_checkpoint(model, tokenizer, directory, dtype="bfloat16", overwrite=True),
                       device)
    return seconds


def evaluate_checkpoint(args, directory: Path) -> list[dict]:
    from illada_lightning.checkpoint import load_checkpoint
    from illada_lightning.diffusion.scoring_config import ScoringConfig
    from illada_lightning.evaluation import EvalConfig, evaluate
    from illada_lightning.interop.llada_hf import DTYPES, load_hf_checkpoint

    device = torch.device(args.device)
    if args.load_dtype == "auto":
        def load():
            return load_checkpoint(directory, device=device)
    else:
        def load():
            return load_hf_checkpoint(directory, device=device, dtype=DTYPES[args.load_dtype])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (model, tokenizer), load_s = timed(load, device)
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    text_path = Path(args.text) if args.text else (WIKITEXT if WIKITEXT.is_file() else directory / "cloze.txt")
    if not text_path.is_file():
        text_path.write_text(corpus_text(None), encoding="utf-8")
    rows = []
    for rule in args.rules:
        scoring = ScoringConfig(rule=rule, mc_samples=args.mc_samples, mc_batch_size=args.mc_samples)
        cfg = EvalConfig(tasks=["cloze"], data={"cloze": str(text_path)}, scoring=scoring, cloze_items=args.items,
                         num_fewshot=0)
        results, seconds = timed(lambda cfg=cfg: evaluate(model, tokenizer, None, cfg), device)
        n = results["cloze"]["n"]
        rows.append({"bench": "hf_checkpoint", "preset": args.preset, "rule": rule, "items": n,
                     "mc_samples": args.mc_samples if rule == "likelihood" else None,
                     "write_s": args.write_s, "load_s": round(load_s, 3),
                     "host_peak_rss_gb": round(host_peak, 3), "host_rss_before_load_gb": round(rss_before, 3),
                     "gpu_peak_gb": None if gpu_peak is None else round(gpu_peak, 3),
                     "params_dtype": str(next(model.parameters()).dtype),
                     "params_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3), "eval_s": round(seconds, 3),
                     "items_per_s": round(n / seconds, 3), "acc": results["cloze"]["acc"],
                     **environment(device)})
    for row in rows:
        emit(row, args.out)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.phase == "eval":
        return evaluate_checkpoint(args, Path(args.dir))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or Path(tmp) / "ckpt")
        write_s = write_random_checkpoint(args, directory)
        child = [sys.executable, "-m", "benchmarks.hf_checkpoint_bench", "--phase", "eval", "--dir", str(directory),
                 "--preset", args.preset, "--device", args.device, "--items", str(args.items),
                 "--mc-samples", str(args.mc_samples), "--load-dtype", args.load_dtype, "--write-s", f"{write_s:.3f}", "--rules", *args.rules]
        child += ["--text", args.text] if args.text else []
        child += ["--out", args.out] if args.out else []
        done = subprocess.run(child, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise SystemExit(f"evaluation child failed:\n{done.stderr[-4000:]}")
        print(done.stdout, end="")
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    main()
