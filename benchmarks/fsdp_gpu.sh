#!/usr/bin/env bash
# FSDP2 evidence on GPUs (issue 13), one command from the repository root:
#     bash benchmarks/fsdp_gpu.sh            # one GPU: tests, 1b single-device vs strategy=fsdp, illada_8b step
#     bash benchmarks/fsdp_gpu.sh 2          # also the two-GPU rows (1b scaling, illada_8b sharded step)
# Rows are appended to benchmarks/results/train_throughput_<gpu>.jsonl; each line continues after a failure
# (an out-of-memory row is a result too) and the script says which ones failed.
set -u
GPUS=${1:-1}
NAME=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
OUT=benchmarks/results/train_throughput_${NAME}.jsonl
FAILED=()
run() { echo "+ $*"; "$@" || FAILED+=("$*"); }
B=(python -m benchmarks.train_throughput --out "$OUT")

run python -m pytest tests/test_training_gpu.py -m gpu -q
# 1b: strategy=fsdp devices=1 against the single-device path (target: no more than 5 % slower).
ONE_B=(--preset 1b --seq-len 8192 --batch-size 2 --backend varlen --compile --steps 8 --warmup 4)
run "${B[@]}" "${ONE_B[@]}" --strategy auto
run "${B[@]}" "${ONE_B[@]}" --strategy fsdp --devices 1
# illada_8b on one GPU: bf16 weights, gradients and AdamW state (8 B/parameter, ~61 GB) + activation
# checkpointing; then the same with everything offloaded to host memory (GPU memory: one block at a time).
EIGHT_B=(--preset illada_8b --batch-size 1 --backend varlen --activation-checkpointing --precision bf16-true
         --strategy fsdp --steps 3 --warmup 1)
run "${B[@]}" "${EIGHT_B[@]}" --seq-len 8192 --devices 1
run "${B[@]}" "${EIGHT_B[@]}" --seq-len 8192 --devices 1 --fsdp-cpu-offload
if [ "$GPUS" -ge 2 ]; then
  run "${B[@]}" "${ONE_B[@]}" --strategy fsdp --devices 2
  # fp32 master weights and AdamW state (16 B/parameter) sharded over the GPUs, bf16 compute.
  run "${B[@]}" --preset illada_8b --batch-size 1 --backend varlen --activation-checkpointing --precision bf16-mixed \
      --strategy fsdp --steps 3 --warmup 1 --seq-len 8192 --devices "$GPUS"
fi
if [ ${#FAILED[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
