"""Multiple-choice scoring speed: `diffusion.scoring.score_batch` against straightforward references.

    python -m benchmarks.scoring_bench --preset small --questions 64
    python -m benchmarks.scoring_bench --preset 1b --questions 32 --mc-samples 128
    python -m benchmarks.scoring_bench --device cpu --preset tiny        # CI smoke, a few seconds
    python -m benchmarks.scoring_bench --preset small --fast --questions 1838 --min-context 8 --max-context 48 \
        --max-candidate 48                                                # PIQA-sized confidence workload

`--fast` (issue 17) times confidence scoring exact (cache=none, parallel=off) against the context KV cache
(`cache=context`) and threshold reveals (`parallel=threshold`) on the same questions: questions/s, speed-up, the
largest score difference from exact scoring and the fraction of questions whose argmax choice is unchanged.
A trained model (issue 23): `--ckpt PATH` (`il.load_checkpoint`) replaces the random `--preset` weights, and
`--task cloze --task-limit N` scores the cloze task (illada_lightning/evaluation, corpus `--task-data`; or `--task synthetic_choice`) with every
setting: accuracy ± SE and argmax agreement with exact scoring (`bench: scoring_task` rows).

References, written plainly, one candidate at a time with full-sequence logits:
- confidence (iLLaDA Eq. 2): L forwards of [1, context + candidate], each revealing the ground-truth token at
  the most confident masked position;
- likelihood (LLaDA Eq. 6 / Algorithm 3, as in LLaDA's released evaluation code): `mc_samples` masked copies
  per candidate in groups of `mc_batch_size`, stratified mask counts, cross-entropy at the masked positions.

Checks before timing (float32, TF32 off): confidence scores equal the reference (to rtol 1e-4, atol 1e-3); likelihood scores
of one-token candidates equal it to the same tolerance (the estimate is deterministic there) and multi-token ones agree
within 5 combined standard errors (both are Monte-Carlo estimates with different random masks).
Throughput is candidate tokens scored per second; the reference is timed on `--ref-questions` questions.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict

import torch
import torch.nn.functional as F

from illada_lightning import build_model
from illada_lightning.diffusion.likelihood import mask_exactly, stratified_mask_counts
from illada_lightning.diffusion.scoring import score_batch

from .common import (
    emit,
    environment,
    fast_rows,
    fill_preset_defaults,
    precision_scope,
    set_exact_fp32,
    timed,
)


def random_items(n: int, ctx_range, cand_range, n_choices: int, vocab: int, seed: int, single_token=False):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(16, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [(ids(*ctx_range), [ids(1, 1) if single_token else ids(*cand_range) for _ in range(n_choices)])
            for _ in range(n)]


@torch.no_grad()
def reference_confidence(model, context, candidate, mask_id) -> float:
    device = model.output_weight.device
    P, L = len(context), len(candidate)
    x = torch.tensor([list(context) + [mask_id] * L], device=device)
    target = torch.tensor(candidate, device=device)
    total = 0.0
    for _ in range(L):
        logp = model(x).float().log_softmax(-1)[0, P:]
        tgt = logp.gather(-1, target[:, None]).squeeze(-1)
        tgt = torch.where(x[0, P:] == mask_id, tgt, float("-inf"))
        i = int(tgt.argmax())
        total += float(tgt[i])
        x[0, P + i] = target[i]
    return total


@torch.no_grad()
def reference_likelihood(model, context, candidate, mask_id, mc_samples, mc_batch_size, generator):
    """(mean, per-sample values) of LLaDA Eq. 6 for one candidate."""
    device = model.output_weight.device
    P, L = len(context), len(candidate)
    full = torch.tensor(list(context) + list(candidate), device=device)
    n_total = 1 if L == 1 else mc_samples
    values = []
    for done in range(0, n_total, mc_batch_size):
        n = min(mc_batch_size, n_total - done)
        counts = stratified_mask_counts(n, L, generator)
        masked = torch.zeros(n, P + L, dtype=torch.bool, device=device)
        masked[:, P:] = mask_exactly(counts, L, generator).to(device)
        x = torch.where(masked, mask_id, full.expand(n, -1))
        logits = model(x).float()
        nll = F.cross_entropy(logits[masked], full.expand(n, -1)[masked], reduction="none")
        row = masked.nonzero()[:, 0]
        per_row = torch.zeros(n, device=device).index_add_(0, row, -nll)
        values.append((per_row * L / counts.to(device)).double().cpu())
    v = torch.cat(values)
    return float(v.mean()), v


def run(args, rule: str) -> dict:
    device = torch.device(args.device)
    model = build_model(args.preset, device=device, init_std=args.init_std).eval()
    cfg = model.config
    mask_id = cfg.mask_token_id
    items = random_items(args.questions, (args.min_context, args.max_context), (1, args.max_candidate),
                         args.choices, cfg.vocab_size, args.seed)
    opts = dict(mc_samples=args.mc_samples, mc_batch_size=args.mc_batch_size,
                max_tokens_per_batch=args.max_tokens_per_batch)
    gen = torch.Generator().manual_seed(args.seed)

    # 1. Correctness against the reference, in exact float32.
    set_exact_fp32(True)
    check = items[: args.check_questions]
    fast = score_batch(model, check, rule, precision="fp32", seed=args.seed, **opts)
    details = {}
    if rule == "confidence":
        ref = [torch.tensor([reference_confidence(model, c, y, mask_id) for y in ys], dtype=torch.float64)
               for c, ys in check]
        ok = all(torch.allclose(f, r, atol=1e-3, rtol=1e-4) for f, r in zip(fast, ref))
        details["max_abs_diff"] = max(float((f - r).abs().max()) for f, r in zip(fast, ref))
    else:
        single = random_items(args.check_questions, (args.min_context, args.max_context), (1, 1), args.choices,
                              cfg.vocab_size, args.seed + 1, single_token=True)
        f1 = score_batch(model, single, rule, precision="fp32", **opts)
        r1 = [torch.tensor([reference_likelihood(model, c, y, mask_id, 1, 1, gen)[0] for y in ys],
                           dtype=torch.float64) for c, ys in single]
        exact_ok = all(torch.allclose(a, b, atol=1e-3, rtol=1e-4) for a, b in zip(f1, r1))
        z = []
        for (c, ys), f in zip(check, fast):
            for y, fv in zip(ys, f.tolist()):
                mean, v = reference_likelihood(model, c, y, mask_id, args.mc_samples, args.mc_batch_size, gen)
                se = math.sqrt(2 * float(v.var()) / len(v)) if len(v) > 1 else 0.0
                z.append(abs(fv - mean) / se if se > 0 else (0.0 if abs(fv - mean) < 1e-4 else math.inf))
        ok = exact_ok and max(z) < 5
        details.update(single_token_exact=exact_ok, max_z=max(z))
    if not ok and not args.allow_mismatch:
        raise SystemExit(f"{rule}: scores differ from the reference: {details}")
    set_exact_fp32(False)

    # 2. Timing.
    if args.dtype == "bf16" and device.type == "cuda":
        model = model.to(torch.bfloat16)
    precision = "bf16" if args.dtype == "bf16" else "fp32"
    score_batch(model, items[:2], rule, precision=precision, seed=args.seed, **opts)  # warm-up
    _, fast_s = timed(lambda: score_batch(model, items, rule, precision=precision, seed=args.seed, **opts), device)
    ref_items = items[: args.ref_questions]
    with precision_scope(device, args.dtype):
        if rule == "confidence":
            fn = lambda: [[reference_confidence(model, c, y, mask_id) for y in ys] for c, ys in ref_items]  # noqa: E731
        else:
            fn = lambda: [[reference_likelihood(model, c, y, mask_id, args.mc_samples, args.mc_batch_size, gen)  # noqa: E731
                           for y in ys] for c, ys in ref_items]
        c0, ys0 = ref_items[0]  # warm-up
        reference_confidence(model, c0, ys0[0], mask_id)
        reference_likelihood(model, c0, ys0[0], mask_id, args.mc_batch_size, args.mc_batch_size, gen)
        _, ref_s = timed(fn, device)
    n_tokens = sum(len(y) for _, ys in items for y in ys)
    n_ref_tokens = sum(len(y) for _, ys in ref_items for y in ys)
    fast_tps, ref_tps = n_tokens / fast_s, n_ref_tokens / ref_s
    return {
        "bench": "scoring", "rule": rule, "preset": args.preset, "questions": args.questions,
        "choices": args.choices, "context_len": [args.min_context, args.max_context],
        "max_candidate": args.max_candidate, "mc_samples": args.mc_samples if rule == "likelihood" else None,
        "dtype": args.dtype, "identical": ok, **details, "fast_s": fast_s, "ref_s": ref_s,
        "ref_questions": len(ref_items), "fast_tokens_per_s": fast_tps, "ref_tokens_per_s": ref_tps,
        "speedup": fast_tps / ref_tps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **environment(device), "model": asdict(cfg),
    }


FAST_SETTINGS = (("none", "off"), ("context", "off"), ("none", "threshold"), ("context", "threshold"))


def task_rows(args, model, tokenizer, name, device) -> list[dict]:
    """The multiple-choice task scored with every setting: accuracy ± SE and argmax agreement with exact."""

    from illada_lightning.diffusion.scoring_config import ScoringConfig
    from illada_lightning.evaluation.backends import model_scorer
    from illada_lightning.evaluation.config import EvalConfig
    from illada_lightning.evaluation.runner import evaluate

    if tokenizer is None:
        raise SystemExit("--task needs a tokenizer: the checkpoint (--ckpt) carries none")
    rows, exact = [], None
    for cache, parallel in FAST_SETTINGS:
        scoring = ScoringConfig(rule="confidence", cache=cache, parallel=parallel, threshold=args.threshold,
                                max_tokens_per_batch=args.max_tokens_per_batch,
                                precision="bf16" if args.dtype == "bf16" else "fp32")
        cfg = EvalConfig(tasks=[args.task], scoring=scoring, limit=args.task_limit,
                         batch_size=args.task_batch_size, data=task_data(args))
        scores: list[list[float]] = []
        inner = model_scorer(model, cfg)

        def recording(items, inner=inner, scores=scores):
            out = inner(items)
            scores.extend(out)
            return out

        metrics, seconds = timed(lambda cfg=cfg, recording=recording:
                                 evaluate(model, tokenizer, [args.task], cfg, scorer=recording)[args.task], device)
        picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
        exact = exact or (picks, scores, seconds)
        rows.append({
            "bench": "scoring_task", "preset": name, "task": args.task, "rule": "confidence", "cache": cache,
            "parallel": parallel, "threshold": args.threshold if parallel == "threshold" else None,
            "acc": metrics["acc"], "acc_stderr": metrics["acc_stderr"], "acc_norm": metrics["acc_norm"],
            "n": metrics["n"], "argmax_agreement": sum(a == b for a, b in zip(picks, exact[0])) / max(1, len(picks)),
            "max_abs_score_diff": max((abs(a - b) for s, e in zip(scores, exact[1]) for a, b in zip(s, e)),
                                      default=0.0),
            "seconds": seconds, "questions_per_s": len(scores) / seconds, "speedup_vs_exact": exact[2] / seconds,
            "dtype": args.dtype, **environment(device),
        })
    return rows


def run_fast(args) -> list[dict]:
    return fast_rows(args, random_item_rows, task_rows)


def random_item_rows(args, model, name, device) -> list[dict]:
    items = random_items(args.questions, (args.min_context, args.max_context), (1, args.max_candidate),
                         args.choices, model.config.vocab_size, args.seed)
    opts = dict(max_tokens_per_batch=args.max_tokens_per_batch, precision="bf16" if args.dtype == "bf16" else "fp32")
    rows, exact = [], None
    for cache, parallel in FAST_SETTINGS:
        o = dict(opts, cache=cache, parallel=parallel, threshold=args.threshold)
        score_batch(model, items[:2], "confidence", **o)  # warm-up
        scores, seconds = timed(lambda o=o: score_batch(model, items, "confidence", **o), device)
        exact = exact or (scores, seconds)
        rows.append({
            "bench": "scoring_fast", "preset": name, "rule": "confidence", "cache": cache, "parallel": parallel,
            "threshold": args.threshold if parallel == "threshold" else None,
            "questions_per_s": len(items) / seconds,
            "tokens_per_s": sum(len(y) for _, ys in items for y in ys) / seconds,
            "speedup_vs_exact": exact[1] / seconds, "token_agreement": None,
            "scores_identical": all(torch.equal(a, b) for a, b in zip(scores, exact[0])),
            "max_abs_score_diff": max(float((a - b).abs().max()) for a, b in zip(scores, exact[0])),
            "argmax_agreement": sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(scores, exact[0])) / len(items),
            "seconds": seconds, "questions": len(items), "choices": args.choices,
            "context_len": [args.min_context, args.max_context], "max_candidate": args.max_candidate,
            "dtype": args.dtype, **environment(device),
        })
    return rows


PRESET_DEFAULTS = {
    "tiny": dict(questions=3, min_context=4, max_context=12, max_candidate=4, ref_questions=1, mc_samples=8,
                 mc_batch_size=8),
    "small": dict(questions=64, min_context=32, max_context=256, max_candidate=24, ref_questions=4,
                  mc_samples=128, mc_batch_size=32),
    "1b": dict(questions=32, min_context=64, max_context=512, max_candidate=24, ref_questions=2,
               mc_samples=128, mc_batch_size=32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_DEFAULTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--rules", nargs="+", default=["confidence", "likelihood"], choices=["confidence", "likelihood"])
    for key in PRESET_DEFAULTS["tiny"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--check-questions", type=int, default=1)
    p.add_argument("--max-tokens-per-batch", type=int, default=65536)
    p.add_argument("--init-std", type=float, default=0.2)
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--fast", action="store_true", help="confidence scoring: exact vs context cache / threshold")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--ckpt", default=None, help="a trained model (run dir, checkpoint, HF dir) instead of --preset")
    p.add_argument("--task", default=None, choices=["cloze", "synthetic_choice"],
                   help="score this evaluation task (needs --ckpt)")
    p.add_argument("--task-limit", type=int, default=None)
    p.add_argument("--task-batch-size", type=int, default=256, help="questions per scorer call on the task")
    p.add_argument("--task-data", default=None,
                   help="the task's data file (cloze: held-out text, default data/corpus/valid.txt; synthetic_choice: "
                        "a test split, default the shipped one)")
    p.add_argument("--skip-random", action="store_true", help="only the task rows (with --task)")
    args = p.parse_args(argv)
    return fill_preset_defaults(args, PRESET_DEFAULTS[args.preset])


def task_data(args) -> dict[str, str]:
    if args.task_data:
        return {args.task: args.task_data}
    return {"cloze": "data/corpus/valid.txt"} if args.task == "cloze" else {}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.fast:
        rows = run_fast(args)
        for r in rows:
            emit(r, args.out)
        print(f"\nconfidence scoring, fast vs exact ({rows[0]['device']}, {rows[0]['preset']}, {args.dtype})")
        print(f"{'bench':13} {'cache':8} {'parallel':14} {'q/s':>8} {'speed-up':>9} {'argmax agree':>12} {'acc':>14}")
        for r in rows:
            par = r["parallel"] + (f"@{r['threshold']}" if r["threshold"] is not None else "")
            acc = f"{100 * r['acc']:.1f} ± {100 * r['acc_stderr']:.1f}%" if "acc" in r else "-"
            print(f"{r['bench']:13} {r['cache']:8} {par:14} {r['questions_per_s']:8.2f} {r['speedup_vs_exact']:8.2f}x "
                  f"{r['argmax_agreement']:12.3f} {acc:>14}")
        return rows
    rows = []
    for rule in args.rules:
        row = run(args, rule)
        rows.append(row)
        emit(row, args.out)
    print(f"\nscoring vs reference ({rows[0]['device']}, {args.dtype})")
    print(f"{'config':40} {'identical':>9} {'fast tok/s':>11} {'ref tok/s':>10} {'ratio':>7}")
    for r in rows:
        name = f"{r['rule']} {r['preset']} Q={r['questions']}x{r['choices']}" + (
            f" mc={r['mc_samples']}" if r["mc_samples"] else "")
        print(f"{name:40} {str(r['identical']):>9} {r['fast_tokens_per_s']:11.1f} {r['ref_tokens_per_s']:10.1f} "
              f"{r['speedup']:6.1f}x")
    return rows


if __name__ == "__main__":
    main()
