"""Print a model preset's parameter counts as one JSON object, built on the meta device (no weights).

    python -m experiments.inspect model=illada_8b [model.n_layers=16 ...]
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

from illada_lightning.config import ConfigError, load_config
from illada_lightning.model.config import ModelConfig


@dataclass
class InspectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)


def main(argv: list[str]) -> dict:
    cfg = load_config(InspectConfig, None, argv)  # before torch is imported: a typo is answered at once
    from illada_lightning import build_model, count_parameters

    model = build_model(cfg.model, device="meta")
    counts = count_parameters(model)
    return {"preset": cfg.model.name, **counts, "device": str(next(model.parameters()).device),
            "config": asdict(cfg.model)}


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__ + "\nkeys: model=<preset> and model.<field>=VALUE for the fields of model.config.ModelConfig")
        sys.exit(0)
    try:
        print(json.dumps(main(sys.argv[1:])))
    except (ConfigError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
