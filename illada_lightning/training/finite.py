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


# ---------------------------------------------------------------------------------------------------------
# nan_check=deferred: the same checks without a host sync per step.


def nonfinite_flag(tensors, device=None) -> torch.Tensor:
    """float32 0-d device tensor: 1 when any of `tensors` holds a NaN or inf, else 0; no host sync.

    One multi-tensor reduction: NaN or inf makes a tensor's L1 norm non-finite (so does a finite tensor whose
    L1 norm overflows float32, > 3e38: a diverged run either way)."""
    ts = [local_tensor(t).detach() for t in tensors if t is not None and t.numel()]
    if not ts:
        return torch.zeros((), device=device)
    norms = torch.stack([n.float() for n in torch._foreach_norm(ts, 1)])
    return (~torch.isfinite(norms.sum())).float()


class DeviceFlag:
    """A sticky 'something was non-finite' flag that lives on the device (nan_check=deferred).

    `mark` ORs a device-side 0/1 into it and remembers the step and kind of the first non-finite value;
    `halt` is what the fused AdamW reads as `found_inf` (a step with found_inf == 1 changes no weight and no
    optimizer state), so from the first non-finite value on, no update happens until the host has read the
    flag. `snapshot` starts a non-blocking copy to pinned host memory; `read` returns an earlier snapshot
    (`wait=False`: the one before the newest, whose work finished long ago) without stalling the GPU queue.
    """

    KINDS = {1: "loss", 2: "gradients", 3: "weights"}

    def __init__(self):
        self.halt: torch.Tensor | None = None  # float32 0-d: 1 once anything was non-finite
        self.first: torch.Tensor | None = None  # float32 [2]: (step, kind) of the first non-finite value
        self._snapshots: list[tuple[torch.Tensor, object]] = []

    def mark(self, bad: torch.Tensor, step: int, kind: int) -> None:
        bad = bad.detach().float().reshape(())
        if self.halt is None:
            self.halt, self.first = torch.zeros_like(bad), torch.full((2,), -1.0, device=bad.device)
        new = (bad > 0) & (self.halt == 0)
        here = torch.stack([torch.full_like(bad, float(step)), torch.full_like(bad, float(kind))])
        self.first = torch.where(new, here, self.first)
        self.halt = torch.maximum(self.halt, (bad > 0).float())

    def snapshot(self) -> None:
        if self.halt is None:
            return
        state = torch.cat([self.halt.reshape(1), self.first])
        if state.is_cuda:
            host = torch.empty(3, pin_memory=True)
            host.copy_(state, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = state.clone(), None
        self._snapshots = (self._snapshots + [(host, event)])[-2:]

    def read(self, wait: bool) -> tuple[bool, int, str] | None:
        """(halted, first step, kind) of the newest snapshot (`wait`) or of the one before it; None if none."""
        if not self._snapshots or (not wait and len(self._snapshots) < 2):
            return None
        host, event = self._snapshots[-1] if wait else self._snapshots[-2]
        if event is not None:
            event.synchronize()  # only up to that copy: later queued work keeps running
        halted, step, kind = host.tolist()
        return halted > 0, int(step), self.KINDS.get(int(kind), "?")
