#!/usr/bin/env bash
# Produce the example reports in reports/examples/: train one model, run the evaluation-only ablations on its
# checkpoint (scoring rule, block length, remasking) and the SFT-epoch sweep (one SFT run, evaluated after
# every epoch), then build every report from MLflow. The numbers in the reports come from this run.
#
#   One GPU (the small model on the synthetic family's harder mix, ~8 minutes; EXAMPLE_SWEEPS to pick sweeps):
#     bash reports/examples/run_example.sh
#   The same pipeline on CPU with the tiny model (a smoke test, minutes):
#     EXAMPLE_SCALE=cpu bash reports/examples/run_example.sh
set -euo pipefail
mkdir -p "${EXAMPLE_ROOT:-runs/example}"
ROOT=$(cd "${EXAMPLE_ROOT:-runs/example}" && pwd)  # absolute: the MLflow URI and checkpoint paths need it
OUT=${EXAMPLE_OUT:-reports/examples}
URI="sqlite:///$ROOT/mlflow.db"
if [[ "${EXAMPLE_SCALE:-gpu}" == cpu ]]; then
  EXP=experiments/configs/default.yaml
  TRAIN="progress_bar=false"  # the default job: SFT of the tiny model from random weights (~80 s)
  LIMIT=200
else
  # The small model on the family's harder mix (experiments/configs/small_family_gpu.yaml), its data generated here.
  EXP=experiments/configs/small_family_gpu.yaml
  [[ -f runs/family_data/train.jsonl ]] || python -m illada_lightning.data.synthetic --out runs/family_data \
    --kinds copy,next,max,add --digits 3 --n-train 40000 --n-valid 200 --n-test 300 --dialogue-fraction 0 --repeat-train
  TRAIN="sft.max_time=00:00:03:00,progress_bar=false"
  LIMIT=300
fi
TRAIN=${EXAMPLE_TRAIN:-$TRAIN}          # e.g. a shorter pretraining when device time is short
SWEEPS=${EXAMPLE_SWEEPS:-"scoring_rule block_length remasking decoding sft_epochs"}
CKPT="$ROOT/example"
common=("tracking_uri=$URI" "experiment=$EXP")

python -m experiments.run "$EXP" name=example "runs_root=$ROOT" "mlflow.tracking_uri=$URI" \
  "mlflow.artifact_location=file://$ROOT/mlartifacts" resume=auto ${TRAIN//,/ } \
  preview.num_prompts=0
has() { [[ " $SWEEPS " == *" $1 "* ]]; }
has scoring_rule && python -m sweeps.run sweeps/scoring_rule.yaml "${common[@]}" "checkpoint=$CKPT" "output_dir=$ROOT/sweeps/scoring_rule" \
  "evaluation.tasks=[synthetic_choice]" "evaluation.overrides=[limit=$LIMIT,scoring.mc_samples=32]"
if [[ -n "${EXAMPLE_GSM8K_LIMIT:-}" ]]; then  # GSM8K end to end through the generation path
  python -m experiments.evaluate "ckpt=$CKPT/sft" "tasks=[gsm8k]" "limit=$EXAMPLE_GSM8K_LIMIT" sampler.gen_length=64 \
    sampler.block_length=32 sampler.steps=64 "out=$ROOT/gsm8k" "tracking_uri=$URI"
fi
has block_length && python -m sweeps.run sweeps/block_length.yaml "${common[@]}" "checkpoint=$CKPT" "output_dir=$ROOT/sweeps/block_length" \
  "evaluation.tasks=[synthetic]" "evaluation.overrides=[limit=$LIMIT,sampler.gen_length=64,sampler.steps=64]"
has remasking && python -m sweeps.run sweeps/remasking.yaml "${common[@]}" "checkpoint=$CKPT" "output_dir=$ROOT/sweeps/remasking" \
  "evaluation.tasks=[synthetic]" "evaluation.overrides=[limit=$LIMIT,sampler.gen_length=64,sampler.block_length=64,sampler.steps=64]"
has decoding && python -m sweeps.run sweeps/decoding.yaml "${common[@]}" "checkpoint=$CKPT" "output_dir=$ROOT/sweeps/decoding" \
  "evaluation.tasks=[synthetic]" "evaluation.overrides=[limit=$LIMIT,sampler.gen_length=64,sampler.block_length=32,sampler.steps=64,sampler.parallel=threshold]"
has sft_epochs && python -m sweeps.run sweeps/sft_epochs.yaml "${common[@]}" "output_dir=$ROOT/sweeps/sft_epochs" \
  "overrides=[stage=sft,progress_bar=false]" \
  "evaluation.tasks=[synthetic]" "evaluation.overrides=[subset_size=$LIMIT,sampler.gen_length=32,sampler.block_length=32,sampler.steps=32]"
[[ "${EXAMPLE_REPORTS:-1}" == 1 ]] || exit 0  # reports can also be made later from the MLflow store
python -m reports.make --experiment illada-lightning --tracking-uri "$URI" --out-root "$OUT" || true
for sweep in $SWEEPS; do
  python -m reports.make --sweep "$sweep" --tracking-uri "$URI" --out-root "$OUT"
done
