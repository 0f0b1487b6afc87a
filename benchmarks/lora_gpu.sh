#!/usr/bin/env bash
# LoRA SFT of illada_8b on one GPU against full training (issue 26), one command from the repository root:
#     bash benchmarks/lora_gpu.sh
# Random weights (no checkpoint download), one 8192-token packed row per step, activation checkpointing,
# precision=bf16-true: the frozen base in bf16, the LoRA adapters (rank 16 on every block projection) and their
# AdamW state in fp32. Rows are appended to benchmarks/results/lora_<gpu>.jsonl (peak_mem_gib, tokens_per_s,
# trainable_params, total_params); each line continues after a failure (an out-of-memory row is a result too).
# With a 10-minute limit per command, run the lines one at a time (each builds the fp32 model on the host first).
set -u
NAME=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
OUT=benchmarks/results/lora_${NAME}.jsonl
FAILED=()
run() { echo "+ $*"; "$@" || FAILED+=("$*"); }
B=(python -m benchmarks.train_throughput --out "$OUT" --preset illada_8b --seq-len 8192 --batch-size 1
   --backend varlen --activation-checkpointing --precision bf16-true --steps 4 --warmup 2)

run python -m pytest tests/test_lora.py -m gpu -q
run "${B[@]}" --lora-rank 16                                 # LoRA, single device (goal: peak <= 40 GiB)
run "${B[@]}" --lora-rank 16 --strategy fsdp --devices 1     # LoRA through FSDP2, as strategy=fsdp training runs it
run "${B[@]}" --strategy fsdp --devices 1                    # full training, the baseline (76.7 GiB measured before)
if [ ${#FAILED[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
