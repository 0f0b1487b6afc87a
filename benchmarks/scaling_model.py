"""A scaling model on paper: FSDP2 training of a preset on many GPUs, from a measured one-GPU rate.

    python -m benchmarks.scaling_model                                    # illada_8b on 8 / 64 / 512 GPUs
    python -m benchmarks.scaling_model --gpus 8 64 512 --intra-gbps 450 --inter-gbps 50 --rows-per-gpu 4
    python -m benchmarks.scaling_model --out benchmarks/results/scaling_model.jsonl

Nothing here is a measurement except the inputs it names. Model:

- Compute per step and GPU = training FLOPs of `rows_per_gpu` packed rows (`model/flops.py`, documents of
  `doc_len` tokens, LM head at half the positions) / (measured GEMM rate x measured MFU), x 8/6 with activation
  checkpointing (the forward is recomputed; off with --no-activation-checkpointing). Defaults: the 52.7 % MFU
  of `1b` on one H200 against its measured 773 TFLOP/s bf16 GEMM rate (benchmarks/NOTES.md); an 8B model has
  larger GEMMs, so this is conservative.
- FSDP2 (`fully_shard` per block, reshard after forward) moves per step and GPU, in a ring, (W-1)/W of: the bf16
  parameters all-gathered twice (forward and backward) and the fp32 gradients reduce-scattered once:
  (2 + 2 + 4) bytes per parameter. Bandwidth: `intra_gbps` (GB/s per GPU, NVLink) within a node of
  `gpus_per_node`, `inter_gbps` (GB/s per GPU, InfiniBand/RoCE) once the ring crosses nodes.
- Overlap: block k+1's all-gather runs under block k's compute; `overlap` is the fraction of communication hidden
  (1.0 = perfect). Step time = compute + max(0, comm - overlap x compute).
- Memory per GPU: 16 bytes per parameter (fp32 weights, fp32 gradients, two fp32 AdamW moments) / W, plus two
  unsharded bf16 blocks in flight, plus activations with activation checkpointing (each block keeps its bf16 input:
  2 x d_model bytes per token per layer) and one block's recomputation working set, plus one LM-head chunk.
"""

from __future__ import annotations

import argparse

from illada_lightning.model.config import get_preset
from illada_lightning.model.flops import non_embedding_params, training_flops

from .common import emit


def parameters(cfg) -> int:
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return non_embedding_params(cfg) + embed


def block_params(cfg) -> int:
    return (non_embedding_params(cfg) - cfg.d_model) // cfg.n_layers


def step_compute_s(cfg, args) -> tuple[float, int]:
    tokens = args.rows_per_gpu * args.seq_len
    docs = [args.doc_len] * (tokens // args.doc_len)
    flops = training_flops(cfg, docs, n_head_tokens=tokens // 2)
    recompute = 8 / 6 if args.activation_checkpointing else 1.0  # the forward runs twice
    return recompute * flops / (args.gemm_tflops * 1e12 * args.mfu), tokens


def step_comm_s(cfg, world: int, args) -> float:
    if world == 1:
        return 0.0
    bytes_moved = 8.0 * parameters(cfg) * (world - 1) / world  # all-gather bf16 x2 + reduce-scatter fp32
    gbps = args.intra_gbps if world <= args.gpus_per_node else args.inter_gbps
    return bytes_moved / (gbps * 1e9)


def memory_gb(cfg, world: int, args) -> dict:
    tokens = args.rows_per_gpu * args.seq_len
    states = 16.0 * parameters(cfg) / world
    in_flight = 2 * 2.0 * block_params(cfg)
    saved = 2.0 * cfg.d_model * tokens * cfg.n_layers
    # one block recomputed: q, k, v, attention out (bf16) + gate, up, product of the SwiGLU (bf16)
    kv = cfg.n_kv_heads * cfg.head_dim
    working = 2.0 * tokens * (2 * cfg.d_model + 2 * kv + 3 * cfg.ffn_dim)
    head_chunk = 4.0 * 8192 * cfg.vocab_size  # one fp32 chunk of masked-position logits
    total = states + in_flight + saved + working + head_chunk
    return {"states_gb": states / 1e9, "activations_gb": (saved + working) / 1e9, "total_gb": total / 1e9}


def model_rows(args) -> list[dict]:
    cfg = get_preset(args.preset)
    compute, tokens = step_compute_s(cfg, args)
    rows = []
    for world in args.gpus:
        comm = step_comm_s(cfg, world, args)
        step = compute + max(0.0, comm - args.overlap * compute)
        rows.append({"bench": "scaling_model", "preset": args.preset, "world_size": world, "strategy": "fsdp2",
                     "rows_per_gpu": args.rows_per_gpu, "activation_checkpointing": args.activation_checkpointing, "seq_len": args.seq_len,
                     "intra_gbps": args.intra_gbps, "inter_gbps": args.inter_gbps, "overlap": args.overlap,
                     "compute_s": compute, "comm_s": comm, "step_s": step,
                     "tokens_per_s_per_gpu": tokens / step, "tokens_per_s": world * tokens / step,
                     "scaling_efficiency": compute / step, **memory_gb(cfg, world, args)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="illada_8b")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--rows-per-gpu", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--doc-len", type=int, default=700, help="mean packed document length (attention FLOPs)")
    ap.add_argument("--gemm-tflops", type=float, default=773.0, help="measured bf16 GEMM rate of one H200")
    ap.add_argument("--mfu", type=float, default=0.527, help="measured MFU of 1b on one H200")
    ap.add_argument("--intra-gbps", type=float, default=450.0, help="GB/s per GPU inside a node (NVLink)")
    ap.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per GPU across nodes (400 Gb/s NIC)")
    ap.add_argument("--overlap", type=float, default=0.8)
    ap.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = model_rows(args)
    print(f"{'GPUs':>5} {'compute s':>9} {'comm s':>7} {'step s':>7} {'tok/s/GPU':>10} {'tok/s':>11} "
          f"{'eff':>5} {'GB/GPU':>7}")
    for r in rows:
        print(f"{r['world_size']:>5} {r['compute_s']:>9.2f} {r['comm_s']:>7.2f} {r['step_s']:>7.2f} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {r['tokens_per_s']:>11,.0f} {r['scaling_efficiency']:>5.0%} "
              f"{r['total_gb']:>7.1f}")
    for r in rows:
        emit(r, args.out)
    return rows


if __name__ == "__main__":
    main()
