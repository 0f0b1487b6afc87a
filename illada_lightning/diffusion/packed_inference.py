"""Running the mask predictor on packed sequences at inference time (shared by sampler and scoring).

Sequences of different lengths are concatenated into ONE flat 1-D token tensor with `cu_seqlens`
(int32 offsets of every sequence): no padding at all, tokens never attend across sequences and RoPE
positions restart per sequence (model/attention.py). Classifier-free guidance doubles the pack: the
unconditional copy (prompt replaced by mask tokens, LLaDA Eq. 16) follows the conditional one in the same
forward, so one step is one forward however many prompts and branches there are.

Only the positions a caller asks for go through the LM head (a MaskPredictor exposes `hidden_states`
and `output_weight`): the rest of the sequence never materialises a vocabulary-sized row. A plain
`model(ids, cu_seqlens=..., max_seqlen=...) -> [T, V]` callable (toy models in tests) also works.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from .likelihood import guided_log_probs
from .sampler_config import PRECISIONS

log = logging.getLogger(__name__)


def model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def model_special_ids(model) -> dict[str, int | None]:
    """mask/eos ids and max_seq_len from `model.config` when the model has one (None otherwise)."""
    cfg = getattr(model, "config", None)
    return {
        "mask_token_id": getattr(cfg, "mask_token_id", None),
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "max_seq_len": getattr(cfg, "max_seq_len", None),
    }


def grad_free_context(model=None):
    """`torch.inference_mode()`, except `torch.no_grad()` for an FSDP2-sharded model.

    FSDP2 allocates its unsharded parameter buffers (and, under mixed precision, their bf16 copies) at the
    first all-gather and reuses them afterwards. Gathered under inference mode they become inference tensors:
    that forward fails ("Inference tensors do not track version counter"), and so does every later training
    step that writes into them. Lightning makes the same choice for FSDP1 (pytorch/pytorch#95957)."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


def inference_context(device: torch.device, precision: str = "auto", model=None):
    """Gradient-free (`grad_free_context`), plus bf16 autocast on CUDA for `auto`/`bf16` (weights already in
    bf16 need none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    stack = contextlib.ExitStack()
    stack.enter_context(grad_free_context(model))
    if device.type == "cuda" and precision in ("auto", "bf16"):
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    elif device.type != "cuda" and precision == "bf16":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int32 [n + 1] offsets from host lengths [n]."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def segment_positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences of host `lengths` [n]: (sequence id [T], offset inside its sequence [T])."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return seq, torch.arange(int(lengths.sum())) - cu_seqlens_from_lengths(lengths).long()[seq]


def _features(model, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """(hidden [T, D], lm_head [V, D]) for a MaskPredictor; (logits [T, V], None) for a plain callable."""
    if hasattr(model, "hidden_states") and hasattr(model, "output_weight"):
        return model.hidden_states(ids, cu_seqlens, max_seqlen), model.output_weight
    return model(ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen), None


def _head(features: torch.Tensor, weight: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    picked = features[rows]
    out = picked if weight is None else F.linear(picked, weight)
    # Keep float64 for float64 models (exact tests); everything else is processed in float32.
    return out.double() if out.dtype == torch.float64 else out.float()


def cfg_pack(
    ids: torch.Tensor, cu_seqlens: torch.Tensor, is_prompt: torch.Tensor, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional + unconditional copies in one pack (LLaDA Eq. 16: the prompt becomes mask tokens)."""
    uncond = ids.masked_fill(is_prompt, mask_token_id)
    total = ids.shape[0]
    return torch.cat([ids, uncond]), torch.cat([cu_seqlens, cu_seqlens[1:] + total])


class PackedForward:
    """One forward over a pack; read (guided) log-probabilities at chosen flat positions, in chunks.

    `positions` index the conditional copy; with CFG the unconditional copy sits at `positions + T`.
    """

    def __init__(self, model, ids, cu_seqlens, max_seqlen, *, is_prompt=None, mask_token_id=None,
                 cfg_scale: float = 0.0):
        self.total = ids.shape[0]
        self.cfg_scale = float(cfg_scale)
        if self.cfg_scale:
            ids, cu_seqlens = cfg_pack(ids, cu_seqlens, is_prompt, mask_token_id)
        self.features, self.weight = _features(model, ids, cu_seqlens, max_seqlen)
        self.row_of = None

    @classmethod
    def from_features(cls, features, weight, total: int, cfg_scale: float = 0.0, row_of=None) -> PackedForward:
        """A PackedForward over features computed elsewhere (the KV-cached path of `block_cache.py`):
        `row_of[p]` is the row of `features` that holds flat pack position p (None: row p)."""
        fwd = cls.__new__(cls)
        fwd.total, fwd.cfg_scale, fwd.features, fwd.weight, fwd.row_of = total, float(cfg_scale), features, weight, row_of
        return fwd

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        return flat if self.row_of is None else self.row_of[flat]

    def scores(self, positions: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities [*positions.shape, V]: raw logits without CFG (every use is
        shift-invariant per row: argmax, softmax, Gumbel-max), Eq. 16 log-probs with CFG."""
        flat = positions.reshape(-1)
        cond = _head(self.features, self.weight, self._rows(flat))
        if self.cfg_scale:
            uncond = _head(self.features, self.weight, self._rows(flat + self.total))
            cond = guided_log_probs(cond, uncond, self.cfg_scale)
            cond = cond.to(torch.float64) if self.features.dtype == torch.float64 else cond
        return cond.view(*positions.shape, -1)

    def target_log_probs(self, positions: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """log p(targets | input) at `positions` (same shape), normalised over the vocabulary, in chunks
        so that only `chunk` vocabulary rows exist at a time."""
        flat_pos, flat_tgt = positions.reshape(-1), targets.reshape(-1)
        out = []
        for start in range(0, flat_pos.numel(), chunk):
            s = self.scores(flat_pos[start : start + chunk])
            tgt = flat_tgt[start : start + chunk, None]
            out.append((s.gather(-1, tgt) - torch.logsumexp(s, -1, keepdim=True)).squeeze(-1))
        if not out:
            return torch.zeros(positions.shape, device=positions.device)
        return torch.cat(out).view(positions.shape)
