#!/usr/bin/env bash
# Issue 23 ("The GPU path measured and fast") on one GPU, section by section (one device call each):
#     bash benchmarks/gpu_round3.sh tests      # pytest -m gpu + the bf16 loading diagnostic          ~5 min
#     bash benchmarks/gpu_round3.sh mfu        # 1b 8192x2: base, fused loss, nan checks, batch 3      ~7 min
#     bash benchmarks/gpu_round3.sh float8     # 1b: bf16 vs float8, 300 steps each from one seed      ~6 min
#     bash benchmarks/gpu_round3.sh 8b         # illada_8b one GPU: checkpointing plans, float8        ~7 min
#     bash benchmarks/gpu_round3.sh decode     # sampler (1b) and scoring (small) speed, random weights ~5 min
#     CKPT=runs/x/sft bash benchmarks/gpu_round3.sh decode-ckpt   # the trained model: accuracy, agreement
# Several sections in one call: `bash benchmarks/gpu_round3.sh mfu float8` (mind the 10-minute limit).
# Each section writes $OUT/<section>.jsonl and $OUT/<section>.log (mfu also a profiler table). The call ends within
# BUDGET seconds (default 560, under the device's 10-minute limit): a command gets at most what is left (minus
# the tables), one that would start with under 45 s left is skipped, and the script ends with the tables of
# `python -m benchmarks.round3_table $OUT`.
# DEVICE=cpu runs every section with tiny presets and a few steps (a dry run: typos and wiring, not numbers).
set -u
OUT=${OUT:-benchmarks/results/round3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-560}  # seconds from the start of this script
mkdir -p "$OUT"
if compgen -G ".device-wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps .device-wheels/*.whl || echo "warning: installing .device-wheels failed"
fi
# Compiled kernels cached inside the repository (an ignored path): later calls on a warm machine reuse them.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
export PYTHONUNBUFFERED=1
FAILED=()

if [ "$DEVICE" = cpu ]; then  # dry run: the same commands on tiny shapes
  P1B=tiny; P8B=tiny; PSMALL=tiny; B=(--device cpu --seq-len 64 --steps 2 --warmup 1)
  LONG=(--device cpu --seq-len 64 --steps 3 --warmup 1); EIGHT=(--device cpu --seq-len 64 --steps 2 --warmup 1)
  SAMPLER=(--device cpu --batch-size 2 --gen-length 8 --steps 8 --block-length 4 --min-prompt 4 --max-prompt 8)
  SCORING=(--device cpu --questions 4 --min-context 4 --max-context 8 --max-candidate 4)
  TASK=(--device cpu --task-limit 4 --gen-length 16 --steps 16 --block-length 8); CLOZE_LIMIT=4
else
  P1B=1b; P8B=illada_8b; PSMALL=small; B=(--seq-len 8192 --steps 45 --warmup 5)
  LONG=(--seq-len 8192 --steps 290 --warmup 10); EIGHT=(--seq-len 8192 --steps 4 --warmup 2)
  SAMPLER=(); SCORING=(--questions 1838 --min-context 8 --max-context 48 --max-candidate 48)
  TASK=(--task-limit 250 --gen-length 64 --steps 64 --block-length 32); CLOZE_LIMIT=500
fi

run() {  # run "label" command...: logged, timed, cut at what is left of BUDGET
  local label=$1; shift
  local left=$((BUDGET - SECONDS - 15))
  if [ "$left" -lt 45 ]; then
    echo "SKIPPED (budget spent): $label" | tee -a "$LOG"; FAILED+=("$label (skipped)"); return
  fi
  local limit=${CMD_TIMEOUT:-480}; [ "$left" -lt "$limit" ] && limit=$left
  echo "+ [$label] (limit ${limit} s) $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1 || FAILED+=("$label (rc=$?)")
  echo "  [$label] $((SECONDS - t0)) s" | tee -a "$LOG"
}

tp() {  # one train_throughput row: tp label options...
  local label=$1; shift
  run "$label" python -m benchmarks.train_throughput --label "$label" --out "$JSONL" "$@"
}

section_tests() {
  run "bf16 parity" python -m benchmarks.bf16_parity --device "$DEVICE" --out "$JSONL"
  run "pytest -m gpu" python -m pytest -m gpu -q -rfEs -p no:cacheprovider --durations=15
}

section_mfu() {  # 1b as issue 23 measured it (49.8 %), then each lever; 50 losses per row to compare
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  local one=(--preset "$P1B" --batch-size 2 --backend varlen --compile "${B[@]}")
  [ "$DEVICE" = cpu ] && one=(--preset "$P1B" --batch-size 2 "${B[@]}")
  tp base "${one[@]}"
  tp fused-loss "${one[@]}" --fused-loss --profile "$OUT/mfu_profile.txt"  # top kernels of its last 2 steps
  tp fused+deferred "${one[@]}" --fused-loss --nan-check deferred
  tp fused+sync-guard "${one[@]}" --fused-loss --nan-check sync
  tp fused-b3 "${one[@]}" --fused-loss --batch-size 3  # the last --batch-size counts
  unset PYTORCH_CUDA_ALLOC_CONF
}

section_float8() {  # 300 steps each from the same seed: speed and how far the losses drift apart
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  local one=(--preset "$P1B" --batch-size 2 --backend varlen --compile --fused-loss --record-losses 300 "${LONG[@]}")
  [ "$DEVICE" = cpu ] && one=(--preset "$P1B" --batch-size 2 --record-losses 300 "${LONG[@]}")
  tp bf16-300 "${one[@]}"
  tp float8-300 "${one[@]}" --float8
  unset PYTORCH_CUDA_ALLOC_CONF
}

section_8b() {  # one GPU, no FSDP (its all-gather/reduce-scatter copies are pure overhead on one device)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  local eight=(--preset "$P8B" --batch-size 1 --backend varlen --precision bf16-true --compile --fused-loss
               --strategy auto "${EIGHT[@]}")
  [ "$DEVICE" = cpu ] && eight=(--preset "$P8B" --batch-size 1 --fused-loss "${EIGHT[@]}")
  local n_keep=24; [ "$DEVICE" = cpu ] && n_keep=3
  tp 8b-ac-full "${eight[@]}" --activation-checkpointing full
  tp "8b-ac-$n_keep" "${eight[@]}" --activation-checkpointing "$n_keep"
  tp 8b-ac-full-f8 "${eight[@]}" --activation-checkpointing full --float8
  unset PYTORCH_CUDA_ALLOC_CONF
}

section_decode() {  # random weights: the timing goals (dual + threshold >= 8x on 1b; scoring cache >= 3x)
  run "sampler 1b" python -m benchmarks.sampler_bench --preset "$P1B" --fast --cache none dual \
      --parallel off threshold factor --cuda-graph both "${SAMPLER[@]}" --out "$JSONL"
  run "scoring small" python -m benchmarks.scoring_bench --preset "$PSMALL" --fast "${SCORING[@]}" --out "$JSONL"
}

section_decode_ckpt() {  # the trained model: exact-match / cloze accuracy ± SE and agreement with exact decoding
  local ckpt=${CKPT:-}
  if [ -z "$ckpt" ] && [ "$DEVICE" = cpu ]; then
    ckpt=$(python -m benchmarks.tiny_checkpoint "$OUT/tiny_ckpt/model.pt" | tail -1)
  fi
  if [ -z "$ckpt" ]; then echo "decode-ckpt needs CKPT=<trained run dir or model.pt>" | tee -a "$LOG"; FAILED+=(decode-ckpt); return; fi
  run "sampler task" python -m benchmarks.sampler_bench --fast --ckpt "$ckpt" --task synthetic --skip-random \
      --cache none dual --parallel off threshold factor --cuda-graph both "${TASK[@]}" --out "$JSONL"
  run "scoring task" python -m benchmarks.scoring_bench --fast --ckpt "$ckpt" --task cloze --task-limit "$CLOZE_LIMIT" \
      --skip-random "${SCORING[@]}" --out "$JSONL"
  if [ "$DEVICE" = cpu ]; then rm -rf "$OUT/tiny_ckpt"; fi
}

[ $# -gt 0 ] || { sed -n '2,13p' "$0"; exit 2; }
for section in "$@"; do
  fn="section_${section//-/_}"
  if ! declare -F "$fn" > /dev/null; then echo "unknown section: $section"; FAILED+=("$section"); continue; fi
  JSONL="$OUT/$section.jsonl"; LOG="$OUT/$section.log"; SECTION_START=$SECONDS
  echo "== $section ($(date -u +%H:%M:%S), commit $(git rev-parse --short HEAD 2>/dev/null))" | tee -a "$LOG"
  { nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; } >> "$LOG"
  "$fn"
  echo "== $section done in $((SECONDS - SECTION_START)) s" | tee -a "$LOG"
done
python -m benchmarks.round3_table "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
