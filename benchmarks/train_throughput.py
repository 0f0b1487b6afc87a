"""Training throughput of the real `PretrainModule` code path: tokens/s, step time, peak memory, MFU.

    python -m benchmarks.train_throughput --preset 1b --seq-len 8192 --batch-size 2 --backend varlen --compile
    python -m benchmarks.train_throughput --preset tiny --device cpu --steps 2 --warmup 1   # CI smoke
    python -m benchmarks.train_throughput --preset illada_8b --seq-len 8192 --batch-size 1 --backend varlen \
        --activation-checkpointing --precision bf16-true --lora-rank 16      # LoRA: frozen bf16 base, fp32 adapters

Each configuration runs `warmup + steps` optimizer steps through Lightning's Trainer on packed rows
(synthetic documents with a realistic length spread, packed by `data.packing` with the random-length split
of iLLaDA §2.1), the masked-diffusion loss, fused AdamW and gradient clipping; only the last `steps` are
timed, with CUDA events around each training batch.

MFU = model FLOPs / step time / measured bf16 matmul rate, where
  - model FLOPs (`model.flops.training_flops`): 6 x non-embedding params x tokens, plus the LM-head matmul
    (6 x vocab x d_model) for the positions where the loss computes logits (the masked ones), plus the
    bidirectional attention matmuls for the actual document lengths of the batch;
  - the matmul rate is measured in the same run (`model.flops.measured_gemm_tflops`, the rate training logs
    as `perf.gemm_tflops`): an 8192^3 bf16 GEMM timed with CUDA events (median of 20), so the ratio is
    honest on any GPU, not a datasheet peak.
`--lora-rank R` trains peft LoRA adapters of rank R on the block projections (`sft.lora`, model/lora.py)
with the base frozen; with `--precision bf16-true` the base is bf16 and the adapters fp32, as in training.
Its MFU keeps the full-training FLOPs count (`flops_basis`): frozen weights get no weight gradients, so a LoRA
step does about 4/6 of that work; compare LoRA rows by tokens/s and peak memory.
`--padded` is the no-packing baseline: one document per row, padded to the row length, SDPA with a mask.
Writes one JSON line per configuration (`--out`) and prints a table.

The levers of issue 23, each one option (defaults: the path measured before them): `--fused-loss` (the loss
chunk's softmax gradient compiled), `--loss-chunk-size`, `--activation-checkpointing [none|full|mlp|N]`,
`--float8` (torchao), `--nan-check none|sync|deferred` (none: the module's per-step loss sync only, as before;
sync: plus NonFiniteLossGuard as training runs it; deferred: the device-side check), `--compile-mode`. Every row
carries the first `--record-losses` losses (same seed and data in every variant: comparable across rows),
`host_syncs_per_step` (torch.cuda sync debug mode over one step) and, on CUDA, an out-of-memory result
(`"oom": true`) instead of a crash. On CUDA the model is built on the device (seeded), in bf16 for bf16-true.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict

import lightning.pytorch as pl
import numpy as np
import torch

from illada_lightning.data.packing import PackedRows, collate_packed_rows
from illada_lightning.data.stream import pack_documents
from illada_lightning.diffusion.objective import DiffusionConfig
from illada_lightning.model.config import get_preset
from illada_lightning.model.flops import measured_gemm_tflops, training_flops
from illada_lightning.model.lora import parameter_counts
from illada_lightning.model.lora_config import LoraConfig
from illada_lightning.provenance import git_commit
from illada_lightning.training.callbacks import NonFiniteLossGuard
from illada_lightning.training.config import OptimConfig, ScheduleConfig
from illada_lightning.training.float8 import convert_to_float8
from illada_lightning.training.lora import trainer_precision
from illada_lightning.training.module import PretrainModule
from illada_lightning.training.strategy import make_strategy

from .common import emit


def measured_float8_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float | None:
    """float8 (e4m3) GEMM rate with per-tensor scales (what torchao's tensorwise recipe runs); None if absent."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return 2 * n**3 / statistics.median(times) / 1e12
    except (RuntimeError, TypeError) as exc:  # an older torch's _scaled_mm signature
        print(f"float8 GEMM rate not measured: {exc}")
        return None


def synthetic_documents(n_tokens: int, vocab: int, seed: int, max_len: int, min_docs: int = 0) -> list[np.ndarray]:
    """Documents with a web-like length spread (log-normal, median ~700 tokens), random token ids."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens or len(docs) < min_docs:
        n = int(np.clip(rng.lognormal(mean=6.5, sigma=1.0), 16, 4 * max_len))
        docs.append(rng.integers(16, vocab, size=n, dtype=np.int32))
        total += n + 1
    return docs


def make_batches(args, cfg, n_batches: int) -> list[dict]:
    docs = synthetic_documents(n_batches * args.batch_size * args.seq_len, cfg.vocab_size, args.seed, args.seq_len,
                               min_docs=n_batches * args.batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    if args.padded:
        # Baseline (a): no packing, one document per row (truncated), padding as its own masked-out segment.
        docs = docs[: n_batches * args.batch_size]
        tokens = np.full((len(docs), args.seq_len), cfg.pad_token_id, dtype=np.int32)
        n_real = np.zeros(len(docs), dtype=np.int64)
        for i, d in enumerate(docs):
            d = np.append(d[: args.seq_len - 1], cfg.eos_token_id)
            tokens[i, : d.size], n_real[i] = d, d.size
        rows = PackedRows(tokens, n_real, [np.zeros(0, dtype=np.int64)] * len(docs))
        p_split = 0.0
    else:
        rows = pack_documents(docs, args.seq_len, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
        p_split = args.p_split
    return [
        collate_packed_rows(rows, range(i * args.batch_size, (i + 1) * args.batch_size), p_split=p_split, generator=gen)
        for i in range(n_batches)
    ]


def useful_lengths(batch: dict) -> list[int]:
    """Lengths of the batch's real documents (padding segments, loss_mask False, do no useful work)."""
    cu = batch["cu_seqlens"].tolist()
    flat = None if batch["loss_mask"] is None else batch["loss_mask"].reshape(-1)
    return [e - s for s, e in zip(cu[:-1], cu[1:]) if flat is None or bool(flat[s])]


class StepTimer(pl.Callback):
    """CUDA-event (or wall-clock on CPU) time of every training batch, forward to optimizer step."""

    def __init__(self, device):
        self.device, self.times, self._start = device, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.times.append((self._start, end))
        else:
            self.times.append(time.perf_counter() - self._start)

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.times]
        return list(self.times)


class SyncCounter(pl.Callback):
    """Host syncs during one training batch, counted by torch.cuda's sync debug mode (one warning each)."""

    def __init__(self, batch: int):
        self.batch, self.count, self._ctx = batch, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.batch and torch.cuda.is_available():
            self._ctx = warnings.catch_warnings(record=True)
            self._seen = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._ctx is not None and batch_idx == self.batch:
            torch.cuda.set_sync_debug_mode("default")
            self._ctx.__exit__(None, None, None)
            self.count = sum("synchroniz" in str(w.message) for w in self._seen)
            self._ctx = None


class ProfileLastSteps(pl.Callback):
    """torch.profiler over the last `n` batches; writes the top kernels by device time to `path`."""

    def __init__(self, first_batch: int, path: str):
        self.first_batch, self.path, self.prof = first_batch, path, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.first_batch:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_train_end(self, trainer, module):
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(self.path, "w") as f:
            f.write(self.prof.key_averages().table(sort_by=key, row_limit=30))


def build_module(args, cfg, device, lora: LoraConfig | None = None) -> PretrainModule:
    """The module of every variant from the same seed; on CUDA built on the device (in bf16 for bf16-true), so
    an 8B model neither waits for a CPU initialisation nor passes through a float32 copy on the GPU."""
    torch.manual_seed(args.seed)
    on_device = device.type == "cuda" and args.strategy == "auto" and not args.fsdp_cpu_offload
    dtype = torch.bfloat16 if on_device and args.precision == "bf16-true" else torch.get_default_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if on_device else contextlib.nullcontext():
            module = PretrainModule(
                cfg, DiffusionConfig(loss_chunk_size=args.loss_chunk_size, fused_loss=args.fused_loss),
                OptimConfig(lr=1e-4, warmup_steps=10, fused=True if args.nan_check == "deferred" else None),
                ScheduleConfig(plateau_switch=False), seed=args.seed,
                activation_checkpointing=args.activation_checkpointing,
                nan_check="deferred" if args.nan_check == "deferred" else "sync", lora=lora,
            )
    finally:
        torch.set_default_dtype(previous)
    if args.float8:
        convert_to_float8(module.model, "gpu" if device.type == "cuda" else "cpu")
    if args.compile:
        module.model.compile_blocks(**({"mode": args.compile_mode} if args.compile_mode else {}))
    return module


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = get_preset(args.preset, max_seq_len=max(args.seq_len, get_preset(args.preset).max_seq_len),
                     attention_backend="sdpa" if args.padded else args.backend)
    n_batches = args.warmup + args.steps
    batches = make_batches(args, cfg, n_batches)
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha).check("--lora")
    module = build_module(args, cfg, device, lora)
    masked_counts: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    real_loss = module._loss

    def counting_loss(batch, generator):  # record the loss and how many positions got logits (no host sync)
        out = real_loss(batch, generator)
        if module.training:
            masked_counts.append(out.n_masked.detach())
            losses.append(out.loss.detach().float())
        return out

    module._loss = counting_loss
    timer = StepTimer(device)
    syncs = SyncCounter(args.warmup - 1 if args.warmup >= 2 else n_batches - 1)  # compiled by then, not timed
    callbacks = [timer, syncs]
    if args.nan_check != "none":  # what training adds: the guard on the loss, gradients and weights
        callbacks.append(NonFiniteLossGuard("stop", tempfile.mkdtemp(prefix="tp-guard-")))
    if args.profile:
        callbacks.append(ProfileLastSteps(n_batches - 2, args.profile))
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    precision, precision_plugins = trainer_precision(args.precision, lora)  # bf16-true + LoRA: fp32 adapters
    trainer = pl.Trainer(
        accelerator=accelerator, devices=args.devices, precision=precision, plugins=precision_plugins or None,
        # the library's strategy factory, as `experiments.run strategy=...` uses it
        strategy=make_strategy(args.strategy, accelerator, str(args.devices), precision=args.precision,
                               cpu_offload=args.fsdp_cpu_offload),
        max_steps=n_batches, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks, use_distributed_sampler=False,  # every rank runs the same number of batches
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, loader)
    except torch.cuda.OutOfMemoryError as exc:  # a result too: how far it got and what it held
        return {**describe(args, cfg, device, trainer.world_size), "oom": True, "error": str(exc).splitlines()[0],
                "completed_steps": len(timer.times),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if not trainer.is_global_zero:
        return None
    world = trainer.world_size
    times = timer.seconds()[args.warmup:]
    timed = batches[args.warmup:]
    n_masked = [int(c) for c in masked_counts[args.warmup:]]
    real_tokens = [int(b["loss_mask"].sum()) if b["loss_mask"] is not None else b["input_ids"].numel() for b in timed]
    flops = [training_flops(cfg, useful_lengths(b), m) for b, m in zip(timed, n_masked)]
    peak = measured_gemm_tflops(device)
    # Every rank processes the same amount of work (its own masks): rank 0's counts times the world size.
    elapsed = sum(times)
    recorded = torch.stack(losses[: args.record_losses]).tolist() if losses else []
    result = {
        **describe(args, cfg, device, world), "oom": False,
        **parameter_counts(module.model), "param_dtypes": param_dtypes(module.model),
        "flops_basis": "full training (6N + head + attention)",
        "tokens_per_s": world * sum(real_tokens) / elapsed,
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
        "model_tflops_per_s": world * sum(flops) / elapsed / 1e12,
        "matmul_peak_tflops": peak,
        "mfu": (sum(flops) / elapsed / 1e12 / peak) if peak else None,  # per device
        "float8_matmul_tflops": measured_float8_tflops(device) if args.float8 else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "reserved_mem_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "device_mem_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                           if device.type == "cuda" else None),
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # CPU offload lives here
        "host_syncs_per_step": syncs.count,
        "losses": recorded, "loss_mean_first": statistics.fmean(recorded) if recorded else None,
        "torch": torch.__version__, "commit": git_commit(), "model": asdict(cfg),
    }
    tokens_per_step = args.batch_size * args.seq_len
    result["peak_mem_bytes_per_token"] = (result["peak_mem_gib"] * 2**30 / tokens_per_step
                                          if result["peak_mem_gib"] is not None else None)
    return result


def param_dtypes(model) -> dict[str, list[str]]:
    """The dtypes of the trainable and the frozen parameters (LoRA under bf16-true: fp32 and bf16)."""
    out: dict[str, set] = {"trainable": set(), "frozen": set()}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).removeprefix("torch."))
    return {k: sorted(v) for k, v in out.items()}


def describe(args, cfg, device, world: int) -> dict:
    """What the row measured (the options of this run)."""
    return {
        "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "backend": "sdpa" if args.padded else args.backend, "packing": not args.padded, "precision": args.precision,
        "compile": args.compile, "compile_mode": args.compile_mode,
        "activation_checkpointing": args.activation_checkpointing, "fused_loss": args.fused_loss,
        "loss_chunk_size": args.loss_chunk_size, "float8": args.float8, "nan_check": args.nan_check,
        "strategy": args.strategy, "world_size": world, "fsdp_cpu_offload": args.fsdp_cpu_offload,
        "p_split": 0.0 if args.padded else args.p_split, "steps": args.steps, "warmup": args.warmup,
        "label": args.label, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha if args.lora_rank else None,
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'preset':8} {'seq':>6} {'bs':>3} {'backend':8} {'pack':5} {'cmp':4} {'lora':>4} {'tok/s':>10} "
            f"{'step ms':>8} {'MFU':>6} {'GiB':>6}")
    print(head)
    for r in rows:
        if r.get("oom"):
            print(f"{r['preset']:8} {r['seq_len']:>6} {r['batch_size']:>3} out of memory after "
                  f"{r['completed_steps']} steps ({r['peak_mem_gib']:.1f} GiB)")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['preset']:8} {r['seq_len']:>6} {r['batch_size']:>3} {r['backend']:8} {str(r['packing']):5} "
              f"{str(r['compile']):4} {r['lora_rank']:>4} {r['tokens_per_s']:>10.0f} {1e3 * r['step_s_median']:>8.1f} {mfu:>6} {mem:>6}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--backend", default="auto", choices=["auto", "varlen", "flash_attn", "sdpa"])
    p.add_argument("--padded", action="store_true", help="baseline: one document per padded row, SDPA")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the blocks (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                   help="none | full (the bare flag) | mlp | N (the first N blocks)")
    p.add_argument("--fused-loss", action="store_true", help="the loss chunk's softmax gradient compiled")
    p.add_argument("--loss-chunk-size", type=int, default=8192)
    p.add_argument("--float8", action="store_true", help="torchao float8 linears in the blocks")
    p.add_argument("--nan-check", default="none", choices=["none", "sync", "deferred"])
    p.add_argument("--record-losses", type=int, default=50, help="losses of the first N micro-batches in the row")
    p.add_argument("--label", default=None, help="a name for the row (tables, comparisons)")
    p.add_argument("--p-split", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"])
    p.add_argument("--fsdp-cpu-offload", action="store_true",
                   help="strategy=fsdp: parameters, gradients and optimizer state in host memory (GPU only)")
    p.add_argument("--devices", type=int, default=1, help="GPUs (or CPU processes) on this node")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full training)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (alpha / rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    p.add_argument("--profile", default=None, help="write a profiler table of the last 2 steps to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu" and args.precision == "bf16-mixed":
        args.precision = "32-true"
    result = run(args)
    if result is None:  # not rank 0
        return None
    print_table([result])
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
