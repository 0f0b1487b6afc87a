"""Print a model preset's parameter counts as one JSON object, built on the meta device (no weights).

    python -m experiments.inspect model=illada_8b [model.n_layers=16 ...]
    python -m experiments.inspect model=illada_8b lora.rank=16    # + LoRA trainable / total counts (sft.lora.*)
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

from illada_lightning.config import ConfigError, load_config
from illada_lightning.model.config import ModelConfig
from illada_lightning.model.lora_config import LoraConfig


@dataclass
class InspectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> InspectConfig:
        self.lora.check("lora")
        return self


def main(argv: list[str]) -> dict:
    cfg = load_config(InspectConfig, None, argv)  # before torch is imported: a typo is answered at once
    from illada_lightning import build_model, count_parameters

    model = build_model(cfg.model, device="meta")
    counts = count_parameters(model)
    if cfg.lora.enabled:
        from illada_lightning.model.lora import adapted_parameter_counts, check_targets

        check_targets(model, cfg.lora, "lora.targets")
        counts.update({f"lora.{k}": v for k, v in adapted_parameter_counts(cfg.model, cfg.lora).items()})
    return {"preset": cfg.model.name, **counts, "device": str(next(model.parameters()).device),
            "config": asdict(cfg.model)}


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__ + "\nkeys: model=<preset> and model.<field>=VALUE for the fields of model.config.ModelConfig; "
              "lora.rank, lora.alpha, lora.dropout, lora.targets")
        sys.exit(0)
    try:
        print(json.dumps(main(sys.argv[1:])))
    except (ConfigError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
