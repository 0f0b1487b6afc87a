"""`DiffusionConfig`: the forward process's settings (the `diffusion` group), without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiffusionConfig:
    mask_eps: float = 1e-3  # t = eps + (1 - eps) * u keeps 1/t <= 1/eps
    stratified_t: bool = False  # low-discrepancy t across the batch: u_i = (i + U) / B
    loss_chunk_size: int = 8192  # masked positions per cross-entropy chunk
    # The chunk's softmax gradient in two torch.compile'd kernels instead of ~8 eager passes over a float32
    # [chunk, vocab] copy (cross_entropy.py); for GPU training, where those passes cost ~10% of a 1b step.
    fused_loss: bool = False

    def validate(self) -> DiffusionConfig:
        if not 0.0 <= self.mask_eps < 1.0:
            raise ValueError(f"diffusion.mask_eps must be in [0, 1), got {self.mask_eps}")
        if self.loss_chunk_size <= 0:
            raise ValueError(f"diffusion.loss_chunk_size must be positive, got {self.loss_chunk_size}")
        return self
