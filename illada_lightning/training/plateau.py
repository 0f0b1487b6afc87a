"""Detecting that the training loss has stopped decreasing (iLLaDA §2.1), as a small pure state machine.

The raw per-step loss of a masked diffusion model is very noisy (t ~ U[0, 1] changes the difficulty of
every batch), so the detector smooths it first: an exponential moving average (bias-corrected, as in Adam)
or the mean of a sliding window. A plateau is `patience` consecutive observations in which the smoothed
loss did not beat its best value by more than `min_delta`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class PlateauDetector:
    smoothing: str = "ema"  # "ema" or "window"
    ema_decay: float = 0.98
    window: int = 100
    patience: int = 500
    min_delta: float = 1e-3
    min_steps: int = 0

    # State (saved in checkpoints through `state_dict`).
    n_seen: int = 0
    ema: float = 0.0
    recent: deque = field(default_factory=deque)
    best: float = math.inf
    since_best: int = 0

    def smoothed(self) -> float | None:
        if self.n_seen == 0:
            return None
        if self.smoothing == "ema":
            return self.ema / (1.0 - self.ema_decay**self.n_seen)  # bias correction for the zero start
        return sum(self.recent) / len(self.recent)

    def update(self, step: int, loss: float) -> bool:
        """Feed the loss of optimizer step `step`; True when the smoothed loss has plateaued."""
        if not math.isfinite(loss):
            return False
        self.n_seen += 1
        self.ema = self.ema_decay * self.ema + (1.0 - self.ema_decay) * loss
        self.recent.append(loss)
        while len(self.recent) > self.window:
            self.recent.popleft()
        warm = len(self.recent) >= self.window if self.smoothing == "window" else True
        if step < self.min_steps or not warm:
            return False
        value = self.smoothed()
        if value < self.best - self.min_delta:
            self.best, self.since_best = value, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"n_seen": self.n_seen, "ema": self.ema, "recent": list(self.recent), "best": self.best,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.n_seen, self.ema = int(state["n_seen"]), float(state["ema"])
        self.recent = deque(state["recent"])
        self.best, self.since_best = float(state["best"]), int(state["since_best"])
