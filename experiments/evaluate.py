"""Evaluate a checkpoint: `python -m experiments.evaluate ckpt=RUN_DIR tasks=[hellaswag,arc_challenge,piqa,gsm8k]
scoring.rule=confidence limit=500 [out=DIR] [data.<task>=PATH] ...` (all keys: `evaluation.cli.EvaluateConfig`)."""

import sys

from illada_lightning.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
