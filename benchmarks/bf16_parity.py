"""Diagnostic of issue 23: bf16 logits of a checkpoint loaded onto the GPU vs the same weights cast to bf16 and vs
the float32 reference (tests/test_hf_checkpoint.py `bf16_parity`). Prints a table and one JSON line.

    python -m benchmarks.bf16_parity --out $OUT/tests.jsonl         # GPU
    python -m benchmarks.bf16_parity --device cpu                    # the same comparison on the CPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tests.test_hf_checkpoint import bf16_parity

from .common import emit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stats = bf16_parity(Path(tmp), args.device)
    print(f"\nbf16 logits, same weights ({stats['device']}; reference logits: std {stats['logit_std']:.2f}, "
          f"max |x| {stats['logit_max_abs']:.1f})")
    print(f"{'comparison':18} {'rel norm':>10} {'max abs':>9} {'> 0.1':>8} {'identical':>9}")
    for key in ("loaded_vs_cast", "loaded_vs_ref", "cast_vs_ref", "fp32_gpu_vs_ref"):
        c = stats[key]
        print(f"{key:18} {c['rel_norm']:10.2e} {c['max_abs']:9.3f} {100 * c['frac_above_0.1']:7.2f}% "
              f"{str(c['identical']):>9}")
    verdict = ("loading path = cast path: the difference is bf16 arithmetic"
               if stats["loaded_vs_cast"]["rel_norm"] < 5e-3 else "LOADING DEFECT: loaded differs from cast")
    print(verdict)
    emit({"bench": "bf16_parity", "verdict": verdict, **stats}, args.out)
    return stats


if __name__ == "__main__":
    main()
