#!/usr/bin/env bash
# One device call: the `small` model learns the synthetic family (experiments/configs/small_family_gpu.yaml),
# then its held-out accuracy and the fast decoding / cached scoring settings against exact decoding on it
# (issue 23 goal 5, issue 24's GPU recipe). Writes $OUT/family.jsonl, $OUT/family.log, the evaluation outputs.
#     OUT=/tmp/out bash benchmarks/gpu_small_family.sh
set -u
OUT=${OUT:-benchmarks/results/family}
mkdir -p "$OUT"
LOG="$OUT/family.log"; JSONL="$OUT/family.jsonl"
export PYTHONUNBUFFERED=1
if compgen -G ".device-wheels/*.whl" > /dev/null; then python3 -m pip install -q --no-deps .device-wheels/*.whl; fi
step() { echo "+ $*" | tee -a "$LOG"; local t0=$SECONDS; timeout "${LIMIT:-300}" "$@" >> "$LOG" 2>&1; echo "  rc=$? $((SECONDS - t0)) s" | tee -a "$LOG"; }
DATA=runs/family_data
step python -m illada_lightning.data.synthetic --out "$DATA" --kinds copy,next,max,add --digits 3 \
  --n-train 40000 --n-valid 200 --n-test 300 --dialogue-fraction 0 --repeat-train
LIMIT=330 step python -m experiments.run experiments/configs/small_family_gpu.yaml mlflow.enabled=false progress_bar=false
CKPT=runs/small_family/sft
LIMIT=120 step python -m experiments.evaluate "ckpt=$CKPT" "tasks=[synthetic,synthetic_choice]" "data.synthetic=$DATA/test.jsonl" \
  "data.synthetic_choice=$DATA/test.jsonl" limit=300 mlflow=false "out=$OUT/eval"
LIMIT=150 step python -m benchmarks.sampler_bench --fast --ckpt "$CKPT" --task synthetic --task-data "$DATA/test.jsonl" \
  --skip-random --cache none dual --parallel off threshold factor --cuda-graph off --task-limit 300 \
  --gen-length 64 --steps 64 --block-length 32 --out "$JSONL"
LIMIT=90 step python -m benchmarks.scoring_bench --fast --ckpt "$CKPT" --task synthetic_choice --task-data "$DATA/test.jsonl" \
  --task-limit 300 --skip-random --out "$JSONL"
cp runs/small_family/sft/FINISHED "$OUT/sft_FINISHED.json" 2>/dev/null
tail -5 "$LOG"
