"""What low-rank adapters to train (`sft.lora.*`); no torch here, so a mistyped key fails before torch loads.

LoRA (Hu et al., 2021): a frozen weight W [out, in] is used as W + (alpha / rank) * B A, with A [rank, in]
and B [out, rank] trained and B starting at zero (the adapted model starts as the base model). The adapters
are Hugging Face `peft`'s (model/lora.py); `rank: 0` means no adapters: plain full-parameter SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The Linear projections of every Transformer block of `MaskPredictor` (model/transformer.py): the fused
# q|k|v projection, the attention output, the fused SwiGLU gate|up and the down projection.
DEFAULT_TARGETS = ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")


@dataclass
class LoraConfig:
    """`rank` 0 = off. `targets`: module names, each matching a module whose name is it or ends with
    `.<target>` (peft's rule for a list); every target must match the same projection in every block."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank (fixed alpha while sweeping rank, as the LoRA paper)
    # 0 keeps training deterministic (no draws from the global RNG), so resume=auto continues exactly.
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def check(self, where: str) -> LoraConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{where}.{msg}")

        need(isinstance(self.rank, int) and self.rank >= 0, f"rank must be an integer >= 0 (0: off), got {self.rank!r}")
        need(self.alpha > 0, f"alpha must be positive, got {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        targets = list(self.targets)
        need(bool(targets) and all(isinstance(t, str) and t.strip() for t in targets),
             f"targets must be a non-empty list of module names, got {targets}")
        need(len(set(targets)) == len(targets), f"targets has duplicates: {targets}")
        return self
