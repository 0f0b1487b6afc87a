"""Are the weights (or gradients) finite? One answer agreed by every rank.

Checked before every optimizer step (gradients) and after it (weights), and before every checkpoint save:
an update can turn weights into NaN/inf while the loss that produced it was still finite (a huge LR), and a
checkpoint of such weights would poison every later resume or rollback.
"""

from __future__ import annotations

import torch

from .strategy import local_tensor


def count_nonfinite(tensors) -> int:
    """How many of `tensors` hold a NaN or inf (one host sync for all of them)."""
    flags = [~torch.isfinite(local_tensor(t).detach()).all() for t in tensors if t is not None and t.numel()]
    return int(torch.stack(flags).sum()) if flags else 0


def agreed(trainer, count: int) -> int:
    """`count` summed over ranks (a no-op on one process), so every rank takes the same decision."""
    if trainer is None or trainer.world_size <= 1:
        return count
    total = trainer.strategy.reduce(torch.tensor(float(count), device=trainer.strategy.root_device), reduce_op="sum")
    return int(total)


def weights_finite(trainer, module) -> bool:
    return agreed(trainer, count_nonfinite(list(module.parameters()))) == 0


def grads_finite(trainer, module) -> bool:
    return agreed(trainer, count_nonfinite([p.grad for p in module.parameters()])) == 0
