"""Sampler speed: `diffusion.sampler.generate` against a straightforward LLaDA reference sampler.

    python -m benchmarks.sampler_bench --preset small --batch-size 64 --gen-length 256 --steps 256 --block-length 32
    python -m benchmarks.sampler_bench --preset 1b --batch-size 32 --gen-length 256 --steps 256 --block-length 32
    python -m benchmarks.sampler_bench --device cpu --preset tiny        # CI smoke, a few seconds
    python -m benchmarks.sampler_bench --preset 1b --fast --out benchmarks/results/sampler_fast_h200.jsonl

`--fast` (issue 17) times, in one run on the same prompts, the exact sampler (cache=none, parallel=off) and every
`--cache` × `--parallel` setting (block KV cache, confidence-threshold or factor-rule parallel decoding; with
`--cuda-graph on|both` the cached steps replayed as CUDA graphs), with the fraction of generated tokens
identical to exact decoding (`token_agreement`). Random weights are far from a trained model's confidence
profile, so `parallel=threshold` speed-ups here are not the ones a trained checkpoint gets.

A trained model (issue 23): `--ckpt PATH` (a run directory, checkpoint file or HF directory, `il.load_checkpoint`)
replaces the random `--preset` model; `--task synthetic --task-limit N` then decodes the synthetic exact-match
task (illada_lightning/evaluation) with every setting: exact-match accuracy ± SE, token agreement and answer
agreement with exact decoding, tokens/s (`bench: sampler_task` rows; `--skip-random` drops the random-prompt rows):

    python -m benchmarks.sampler_bench --fast --ckpt runs/small_gpu/sft --task synthetic --task-limit 250 \
        --parallel off threshold factor --cuda-graph both --out $OUT/decode.jsonl

The reference (`reference_generate`, below) is LLaDA's published algorithm written plainly: one prompt at a
time, a [1, prompt + gen_length] input, full-sequence logits every step, low-confidence remasking
(Algorithm 5) inside the current block, a per-row top-k. Both sides use the same model and weights
(random, with `--init-std` large enough that predictions are far from ties), greedy decoding, EOS disabled
(`logits_eos_inf`, so every prompt does the full work) and the mask token never proposed.

Outputs are compared first: exactly, in float32 (TF32 off), on `--check-prompts` prompts; then both are
timed in `--dtype` (bf16 on GPU) and the bf16 token agreement is printed for information (bf16 rounding
depends on batch shape, so near-ties may flip). tokens/s counts generated tokens; the reference is timed on
`--ref-prompts` prompts and its rate applies per prompt (it is sequential). One JSON line per run (`--out`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
import torch.nn.functional as F

from illada_lightning import build_model
from illada_lightning.diffusion import block_cache
from illada_lightning.diffusion.sampler import generate

from .common import (
    emit,
    environment,
    fast_rows,
    fill_preset_defaults,
    precision_scope,
    set_exact_fp32,
    timed,
)


def random_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [torch.randint(16, vocab, (int(n_),), generator=g).tolist() for n_ in lengths]


# --------------------------------------------------------------------------------------------------
# The straightforward reference (LLaDA's published algorithm, one sequence at a time).


@torch.no_grad()
def reference_generate(model, prompt: list[int], *, steps: int, gen_length: int, block_length: int,
                       cfg_scale: float, mask_id: int, eos_id: int) -> list[int]:
    device = model.output_weight.device
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long, device=device)
    x[0, :P] = torch.tensor(prompt, device=device)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        hi = P + (b + 1) * block_length  # end of the current block
        n_masked = block_length
        schedule = [n_masked // per_block + (i < n_masked % per_block) for i in range(per_block)]
        for k in schedule:
            if cfg_scale:
                uncond = x.clone()
                uncond[0, :P] = mask_id
                both = model(torch.cat([x, uncond])).float()
                logits = (1 + cfg_scale) * both[:1].log_softmax(-1) - cfg_scale * both[1:].log_softmax(-1)
            else:
                logits = model(x).float()
            logits[..., mask_id] = float("-inf")
            logits[..., eos_id] = float("-inf")  # logits_eos_inf
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            conf = p.gather(-1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = float("-inf")  # never beyond the current block
            masked = x == mask_id
            conf = torch.where(masked, conf, float("-inf"))
            x0 = torch.where(masked, x0, x)
            for row in range(x.shape[0]):  # per-row top-k, as published
                idx = torch.topk(conf[row], k).indices
                x[row, idx] = x0[row, idx]
    return x[0, P:].tolist()


# --------------------------------------------------------------------------------------------------


def run(args) -> dict:
    device = torch.device(args.device)
    model = build_model(args.preset, device=device, init_std=args.init_std).eval()
    cfg = model.config
    opts = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                cfg_scale=args.cfg_scale, logits_eos_inf=True)
    ref_opts = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length or args.gen_length,
                    cfg_scale=args.cfg_scale, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id)
    prompts = random_prompts(args.batch_size, args.min_prompt, args.max_prompt, cfg.vocab_size, args.seed)

    # 1. Identical outputs, in exact float32.
    set_exact_fp32(True)
    check = prompts[: args.check_prompts]
    fast_check = generate(model, check, precision="fp32", **opts)
    ref_check = [reference_generate(model, p, **ref_opts) for p in check]
    identical = fast_check == ref_check
    if not identical and not args.allow_mismatch:
        raise SystemExit(f"outputs differ from the reference in float32: {fast_check} vs {ref_check}")
    set_exact_fp32(False)

    # 2. Timing in the benchmark precision.
    if args.dtype == "bf16" and device.type == "cuda":
        model = model.to(torch.bfloat16)
    precision = "bf16" if args.dtype == "bf16" else "fp32"
    generate(model, prompts[:2], precision=precision, **opts)  # warm-up
    fast_out, fast_s = timed(lambda: generate(model, prompts, precision=precision, **opts), device)
    ref_prompts = prompts[: args.ref_prompts]
    with precision_scope(device, args.dtype):
        reference_generate(model, ref_prompts[0], **ref_opts)  # warm-up
        ref_out, ref_s = timed(lambda: [reference_generate(model, p, **ref_opts) for p in ref_prompts], device)
    agree = sum(a == b for f, r in zip(fast_out, ref_out) for a, b in zip(f, r))
    fast_tps = len(prompts) * args.gen_length / fast_s
    ref_tps = len(ref_prompts) * args.gen_length / ref_s
    return {
        "bench": "sampler", "preset": args.preset, "batch_size": args.batch_size,
        "prompt_len": [args.min_prompt, args.max_prompt], "gen_length": args.gen_length, "steps": args.steps,
        "block_length": args.block_length or args.gen_length, "cfg_scale": args.cfg_scale, "dtype": args.dtype,
        "identical_fp32": identical, "check_prompts": len(check),
        "timed_agreement": agree / max(1, len(ref_prompts) * args.gen_length),
        "fast_s": fast_s, "ref_s": ref_s, "ref_prompts": len(ref_prompts),
        "fast_tokens_per_s": fast_tps, "ref_tokens_per_s": ref_tps, "speedup": fast_tps / ref_tps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **environment(device), "model": asdict(cfg),
    }


def fast_settings(args) -> list[tuple[str, str, bool]]:
    """(cache, parallel, cuda_graph): exact decoding first, then every requested combination."""
    graphs = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graph]
    rows = [("none", "off", False)]
    for cache in args.cache:
        for parallel in args.parallel:
            for graph in (graphs if cache != "none" else [False]):
                if (cache, parallel, graph) not in rows:
                    rows.append((cache, parallel, graph))
    return rows


def token_agreement(out: list[list[int]], exact: list[list[int]]) -> float:
    """Positions where a generation equals exact decoding, over the longer of the two (length differences count)."""
    same = sum(a == b for f, r in zip(out, exact) for a, b in zip(f, r))
    return same / max(1, sum(max(len(f), len(r)) for f, r in zip(out, exact)))


def setting_fields(args, cache, parallel, graph) -> dict:
    return {"cache": cache, "parallel": parallel, "cuda_graph": graph,
            "threshold": args.threshold if parallel == "threshold" else None,
            "factor": args.factor if parallel == "factor" else None}


def run_fast(args) -> list[dict]:
    """Exact vs cached / parallel decoding on the same prompts: tokens/s, speed-up and token agreement."""
    return fast_rows(args, random_prompt_rows, task_rows)


def random_prompt_rows(args, model, name, device) -> list[dict]:
    prompts = random_prompts(args.batch_size, args.min_prompt, args.max_prompt, model.config.vocab_size, args.seed)
    opts = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length, cfg_scale=args.cfg_scale,
                logits_eos_inf=True, precision="bf16" if args.dtype == "bf16" else "fp32")
    rows, exact = [], None
    for cache, parallel, graph in fast_settings(args):
        o = dict(opts, cache=cache, parallel=parallel, threshold=args.threshold, factor=args.factor, cuda_graph=graph)
        generate(model, prompts[:2], **o)  # warm-up
        before = dict(block_cache.graph_counts)
        out, seconds = timed(lambda o=o: generate(model, prompts, **o), device)
        exact = exact or (out, seconds)
        rows.append({
            "bench": "sampler_fast", "preset": name, **setting_fields(args, cache, parallel, graph),
            "tokens_per_s": len(prompts) * args.gen_length / seconds, "speedup_vs_exact": exact[1] / seconds,
            "token_agreement": token_agreement(out, exact[0]), "seconds": seconds,
            "graphs": {k: v - before[k] for k, v in block_cache.graph_counts.items()},
            "batch_size": args.batch_size, "prompt_len": [args.min_prompt, args.max_prompt],
            "gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
            "cfg_scale": args.cfg_scale, "dtype": args.dtype, "init_std": None if args.ckpt else args.init_std,
            **environment(device),
        })
    return rows


def task_rows(args, model, tokenizer, name, device) -> list[dict]:
    """The evaluation task decoded with every setting: accuracy ± SE and agreement with exact decoding."""

    from illada_lightning.diffusion.sampler_config import SamplerConfig
    from illada_lightning.evaluation.backends import model_generator
    from illada_lightning.evaluation.config import EvalConfig
    from illada_lightning.evaluation.runner import evaluate

    if tokenizer is None:
        raise SystemExit("--task needs a tokenizer: the checkpoint (--ckpt) carries none")
    rows, exact = [], None
    for cache, parallel, graph in fast_settings(args):
        sampler = SamplerConfig(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                                variable_length=args.variable_length, cache=cache, parallel=parallel,
                                threshold=args.threshold, factor=args.factor, cuda_graph=graph,
                                precision="bf16" if args.dtype == "bf16" else "fp32")
        cfg = EvalConfig(tasks=[args.task], sampler=sampler, limit=args.task_limit, batch_size=args.task_batch_size,
                         data={args.task: args.task_data} if args.task_data else {})
        generated: list[list[int]] = []
        inner = model_generator(model, tokenizer, cfg)

        def recording(prompts, stop_strings=(), inner=inner, generated=generated):
            out = inner(prompts, stop_strings)
            generated.extend(out)
            return out

        metrics, seconds = timed(lambda cfg=cfg, recording=recording:
                                 evaluate(model, tokenizer, [args.task], cfg, generator=recording)[args.task], device)
        answers = [tokenizer.decode(ids) for ids in generated]
        exact = exact or (generated, answers, seconds)
        rows.append({
            "bench": "sampler_task", "preset": name, "task": args.task, **setting_fields(args, cache, parallel, graph),
            "exact_match": metrics["exact_match"], "exact_match_stderr": metrics["exact_match_stderr"],
            "n": metrics["n"], "token_agreement": token_agreement(generated, exact[0]),
            "output_agreement": sum(a == b for a, b in zip(answers, exact[1])) / max(1, len(answers)),
            "generated_tokens": sum(map(len, generated)), "seconds": seconds,
            "tokens_per_s": sum(map(len, generated)) / seconds, "speedup_vs_exact": exact[2] / seconds,
            "gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
            "variable_length": args.variable_length, "dtype": args.dtype, **environment(device),
        })
    return rows


def print_fast_table(rows: list[dict]) -> None:
    for bench in ("sampler_fast", "sampler_task"):
        part = [r for r in rows if r["bench"] == bench]
        if not part:
            continue
        print(f"\n{bench}: fast decoding vs exact ({part[0]['device']}, {part[0]['preset']}, {part[0]['dtype']})")
        print(f"{'cache':7} {'parallel':14} {'graph':5} {'tok/s':>9} {'speed-up':>9} {'agreement':>10}"
              + ("  exact match" if bench == "sampler_task" else ""))
        for r in part:
            par = r["parallel"] + (f"@{r['threshold']}" if r["threshold"] is not None else "") + (
                f"@{r['factor']}" if r["factor"] is not None else "")
            acc = f"  {100 * r['exact_match']:.1f} ± {100 * r['exact_match_stderr']:.1f}%" if "exact_match" in r else ""
            print(f"{r['cache']:7} {par:14} {str(r['cuda_graph']):5} {r['tokens_per_s']:9.1f} "
                  f"{r['speedup_vs_exact']:8.2f}x {r['token_agreement']:10.3f}{acc}")


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'config':44} {'identical':>9} {'fast tok/s':>11} {'ref tok/s':>10} {'ratio':>7}")
    for r in rows:
        name = (f"{r['preset']} B={r['batch_size']} gen={r['gen_length']} steps={r['steps']} "
                f"blk={r['block_length']} cfg={r['cfg_scale']}")
        print(f"{name:44} {str(r['identical_fp32']):>9} {r['fast_tokens_per_s']:11.1f} "
              f"{r['ref_tokens_per_s']:10.1f} {r['speedup']:6.1f}x")


PRESET_DEFAULTS = {
    "tiny": dict(batch_size=4, gen_length=8, steps=8, block_length=4, min_prompt=4, max_prompt=12, ref_prompts=1),
    "small": dict(batch_size=64, gen_length=256, steps=256, block_length=32, min_prompt=32, max_prompt=256,
                  ref_prompts=4),
    "1b": dict(batch_size=32, gen_length=256, steps=256, block_length=32, min_prompt=64, max_prompt=512,
               ref_prompts=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_DEFAULTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="timing precision (bf16 on GPU)")
    for key in ("batch_size", "gen_length", "steps", "block_length", "min_prompt", "max_prompt", "ref_prompts"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=[0.0], nargs="+", help="one run per value")
    p.add_argument("--check-prompts", type=int, default=2)
    p.add_argument("--init-std", type=float, default=0.2, help="random weights far from ties")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--fast", action="store_true", help="time cache x parallel settings against the exact sampler")
    p.add_argument("--cache", nargs="+", default=["none", "prefix", "dual"], choices=["none", "prefix", "dual"])
    p.add_argument("--parallel", nargs="+", default=["off", "threshold"], choices=["off", "threshold", "factor"])
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0, help="parallel=factor: Fast-dLLM's factor")
    p.add_argument("--cuda-graph", default="off", choices=["off", "on", "both"],
                   help="cached settings with cuda_graph=true (on), or both ways (both)")
    p.add_argument("--ckpt", default=None, help="a trained model (run dir, checkpoint, HF dir) instead of --preset")
    p.add_argument("--task", default=None, choices=["synthetic"], help="decode this evaluation task (needs --ckpt)")
    p.add_argument("--task-limit", type=int, default=None, help="first N task examples")
    p.add_argument("--task-data", default=None, help="the task's test split (default: the shipped one)")
    p.add_argument("--task-batch-size", type=int, default=64, help="prompts per sampler call on the task")
    p.add_argument("--variable-length", action="store_true", help="task: iLLaDA's block-by-block generation")
    p.add_argument("--skip-random", action="store_true", help="only the task rows (with --task)")
    args = p.parse_args(argv)
    return fill_preset_defaults(args, PRESET_DEFAULTS[args.preset])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.fast:
        rows = [r for cfg_scale in args.cfg_scale
                for r in run_fast(argparse.Namespace(**{**vars(args), "cfg_scale": cfg_scale}))]
        for row in rows:
            emit(row, args.out)
        print_fast_table(rows)
        return rows
    rows = []
    for cfg_scale in args.cfg_scale:
        args_i = argparse.Namespace(**{**vars(args), "cfg_scale": cfg_scale})
        row = run(args_i)
        rows.append(row)
        emit(row, args.out)
    print_table(rows, f"sampler vs LLaDA reference ({rows[0]['device']}, {args.dtype})")
    return rows


if __name__ == "__main__":
    main()
