#!/usr/bin/env bash
# Evidence for the fidelity fixes at CPU scale (iLLaDA §2.2 SFT layout; LLaDA Eq. 6 stratification):
#   bash benchmarks/fidelity_cpu.sh            # ~15 min on 2 quiet cores; rows in benchmarks/results/fidelity_cpu.jsonl
# The tiny preset is pretrained on real text (../shared/data: WikiText-2 test + Tiny Shakespeare), fine-tuned twice on
# the shipped instruction set (sft.data.attention=window / per_example), and generates with variable-length block
# generation (§2.3) on the synthetic test split (benchmarks/sft_eos_placement.py); the cloze task (held-out
# WikiText-2 valid) is scored on the same checkpoint and seed with the likelihood rule under both Eq. 6
# stratifications, and with the confidence rule. On a GPU, set FIDELITY_EXP=experiments/configs/small_gpu.yaml.
set -euxo pipefail
ROOT=$(mkdir -p "${FIDELITY_ROOT:-runs/fidelity}" && cd "${FIDELITY_ROOT:-runs/fidelity}" && pwd)
OUT=${FIDELITY_OUT:-benchmarks/results/fidelity_cpu.jsonl}
EXP=${FIDELITY_EXP:-experiments/configs/default.yaml}
DATA=${SHARED_DATA:-../shared/data}
python -m experiments.run "$EXP" name=pre "runs_root=$ROOT" stage=pretrain \
  "pretrain.data.train_files=[$DATA/wikitext-2/test.txt,$DATA/tinyshakespeare/input.txt]" \
  "pretrain.data.val_files=[$DATA/wikitext-2/valid.txt]" pretrain.max_steps=400 pretrain.schedule.decay_steps=150 \
  pretrain.ckpt_every_n_steps=200 pretrain.val_every_n_steps=200 progress_bar=false preview.num_prompts=0 resume=auto
for att in window per_example; do
  python -m experiments.run "$EXP" "name=sft_$att" "runs_root=$ROOT" stage=sft "init_from=$ROOT/pre/pretrain" \
    "sft.data.attention=$att" sft.epochs=6 progress_bar=false preview.num_prompts=0 resume=auto
  python -m benchmarks.sft_eos_placement --ckpt "$ROOT/sft_$att/sft" --label "$att" --block-length 8 \
    --max-new-tokens 32 --out "$OUT"
done
cloze=("ckpt=$ROOT/pre/pretrain" "tasks=[cloze]" "data.cloze=$DATA/wikitext-2/valid.txt" limit=500 seed=7)
for strat in uniform llada_released; do
  python -m experiments.evaluate "${cloze[@]}" scoring.rule=likelihood "scoring.mc_stratification=$strat" \
    scoring.mc_samples=32 scoring.mc_batch_size=32 "out=$ROOT/cloze_$strat"
done
python -m experiments.evaluate "${cloze[@]}" scoring.rule=confidence "out=$ROOT/cloze_confidence"
