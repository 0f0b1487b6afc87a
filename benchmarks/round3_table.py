"""The short tables of `benchmarks/gpu_round3.sh`: every JSON line under a results folder, grouped by bench.

    python -m benchmarks.round3_table $OUT

Training rows: tokens/s, MFU, peak memory and headroom, host syncs per step, and how far the row's first losses
are from its section's reference row (same preset and batch, first row of the file; same seed, data and masks, so
a difference is the variant's numerics plus run-to-run noise: FlashAttention's backward is not deterministic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_rows(folder: Path) -> list[tuple[str, dict]]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append((path.stem, json.loads(line)))
                except json.JSONDecodeError:
                    print(f"{path.name}: unreadable line {line[:80]!r}")
    return rows


def loss_gap(row: dict, ref: dict | None) -> str:
    """max |Δloss| / mean loss over the losses both rows recorded ('-' without a reference)."""
    a, b = row.get("losses") or [], (ref or {}).get("losses") or []
    n = min(len(a), len(b))
    if ref is None or row is ref or n == 0:
        return "ref" if ref is row else "-"
    mean = sum(b[:n]) / n
    return f"{max(abs(x - y) for x, y in zip(a[:n], b[:n])) / mean:.1e} ({n})"


def training_table(rows: list[tuple[str, dict]]) -> None:
    train = [(f, r) for f, r in rows if ("tokens_per_s" in r and "mfu" in r) or r.get("oom")]
    if not train:
        return
    print(f"\ntraining ({train[0][1].get('device')})")
    print(f"{'file':7} {'label':16} {'preset':9} {'bs':>2} {'ckpt':6} {'f8':3} {'nan':8} {'tok/s':>8} {'MFU':>6} "
          f"{'GiB':>5} {'free':>5} {'sync':>4} {'max|Δloss|/loss':>16}")
    refs: dict[tuple, dict] = {}
    for file, r in train:
        ref = refs.setdefault((file, r["preset"], r["seq_len"], r["batch_size"]), r)
        label = (r.get("label") or "-")[:16]
        if r.get("oom"):
            print(f"{file:7} {label:16} {r['preset']:9} {r['batch_size']:>2} out of memory after "
                  f"{r.get('completed_steps')} steps, {r.get('peak_mem_gib', 0):.1f} GiB")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        gib = r.get("peak_mem_gib")
        free = f"{r['device_mem_gib'] - gib:.1f}" if gib is not None and r.get("device_mem_gib") else "-"
        gib = f"{gib:.1f}" if gib is not None else "-"
        syncs = r.get("host_syncs_per_step")
        print(f"{file:7} {label:16} {r['preset']:9} {r['batch_size']:>2} {str(r.get('activation_checkpointing'))[:6]:6} "
              f"{'y' if r.get('float8') else 'n':3} {r.get('nan_check', '-'):8} {r['tokens_per_s']:8.0f} {mfu:>6} "
              f"{gib:>5} {free:>5} {'-' if syncs is None else syncs:>4} {loss_gap(r, ref):>16}")


def decoding_tables(rows: list[tuple[str, dict]]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for _, r in rows:
        if r.get("bench") in ("sampler_fast", "sampler_task", "scoring_fast", "scoring_task"):
            groups.setdefault((r["bench"], r.get("preset"), r.get("device")), []).append(r)
    for (bench, preset, device), part in groups.items():
        print(f"\n{bench} ({device}, {preset})")
        for r in part:
            par = r["parallel"] + (f"@{r['threshold']}" if r.get("threshold") is not None else "") + (
                f"@{r['factor']}" if r.get("factor") is not None else "")
            agree = r.get("token_agreement") if r.get("token_agreement") is not None else r.get("argmax_agreement")
            acc = ""
            for key in ("exact_match", "acc"):
                if key in r:
                    acc = f" {key} {100 * r[key]:.1f} ± {100 * r[key + '_stderr']:.1f}%"
            graph = " graph" if r.get("cuda_graph") else ""
            rate = r.get("tokens_per_s") if "sampler" in bench else r.get("questions_per_s")
            print(f"  {r['cache']:8} {par:14}{graph:6} {rate:10.1f}/s {r['speedup_vs_exact']:6.2f}x "
                  f"agreement {agree:.3f}{acc}")


def other_rows(rows: list[tuple[str, dict]]) -> None:
    for _, r in rows:
        if r.get("bench") == "bf16_parity":
            print(f"\nbf16 parity ({r['device']}): {r['verdict']}")
            for key in ("loaded_vs_cast", "loaded_vs_ref", "cast_vs_ref", "fp32_gpu_vs_ref"):
                c = r[key]
                print(f"  {key:16} rel {c['rel_norm']:.2e}  max {c['max_abs']:.3f}  identical {c['identical']}")


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:] or ["."])[0])
    rows = read_rows(folder)
    other_rows(rows)
    training_table(rows)
    decoding_tables(rows)


if __name__ == "__main__":
    main()
