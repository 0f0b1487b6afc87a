"""The one LightningModule of both training stages: model + masked-diffusion objective + AdamW.

`PretrainModule` and `SFTModule` differ only in their LR schedule (iLLaDA §2.1 vs §2.2); the data handling
differs in their datamodules. The objective is `diffusion.objective.diffusion_loss` (iLLaDA Eq. 1) through
the model's `hidden_states` / `output_weight` path, so logits exist only at masked positions.

Randomness of the forward process comes from a generator seeded by (seed, optimizer step, position of the
micro-batch in the step's global batch), not from the global RNG, so a run resumed from a checkpoint draws
the same masks as an uninterrupted one, a global batch draws the same masks however it is split over ranks
and accumulation steps, and validation uses fixed masks (same seed every evaluation) so its loss - the
diffusion bound on the NLL per token - is comparable across evaluations.

Under `strategy=fsdp` `configure_model` shards the model (FSDP2, training/strategy.py); gradient norm,
clipping and the finiteness check then work on the local shards and sum over ranks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict

import lightning.pytorch as pl
import torch

from ..diffusion.objective import DiffusionConfig, diffusion_loss, loss_by_mask_ratio
from ..model.config import ModelConfig
from ..model.flops import flops_from_counts, squared_segment_lengths
from ..model.lora import adapter_settings, add_adapters
from ..model.lora_config import LoraConfig
from ..model.transformer import MaskPredictor
from ..runs import MASK_RATIO_BINS
from .checkpointing import enable_activation_checkpointing
from .config import NAN_CHECKS, OptimConfig, ScheduleConfig
from .finite import DeviceFlag
from .lora import check_resumed_lora
from .schedule import RecipeLR
from .strategy import is_sharded, local_tensor, reshard

_VAL_SEED_OFFSET = 7_777_777


def _as(cls, value):
    return value if isinstance(value, cls) else cls(**value)


def mixing_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (python's hash of ints is not salted, but be explicit)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay every matrix, exempt every vector.

    Decayed: all 2-D weights - attention and MLP projections and the embedding. The embedding is decayed
    like nanoGPT does: when tied (iLLaDA) it *is* the LM-head projection, and iLLaDA/LLaDA state a plain
    AdamW weight decay of 0.1 with no exemption for it. Exempt: the RMSNorm gains (1-D); decay would pull
    a gain towards 0 instead of towards its identity value 1. The model has no biases (iLLaDA §2.1).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _host_copy(t: torch.Tensor):
    """(host tensor, event): a copy that does not wait for the GPU queue (nan_check=deferred)."""
    if not t.is_cuda:
        return t.detach().clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def global_grad_norm(parameters, strategy=None, device=None) -> torch.Tensor:
    """L2 norm of all gradients; with `strategy`, the squared norms of the local shards are summed over ranks
    (FSDP2 shards are disjoint, so this is the norm of the full gradient)."""
    grads = [local_tensor(p.grad.detach()) for p in parameters if p.grad is not None]
    sq = (torch.stack([g.float().pow(2).sum().to(device) for g in grads]).sum() if grads
          else torch.zeros((), device=device))
    if strategy is not None:
        sq = strategy.reduce(sq, reduce_op="sum")
    return sq.sqrt()


class DiffusionLMModule(pl.LightningModule):
    stage = "pretrain"

    def __init__(
        self,
        model_config: ModelConfig | dict,
        diffusion: DiffusionConfig | dict | None = None,
        optim: OptimConfig | dict | None = None,
        schedule: ScheduleConfig | dict | None = None,
        seed: int = 0,
        lr_scale: float = 1.0,
        activation_checkpointing: bool | str | int = False,
        nan_check: str = "sync",
        lora: LoraConfig | dict | None = None,
    ):
        super().__init__()
        self.model_config = _as(ModelConfig, model_config).validate()
        self.diffusion = _as(DiffusionConfig, diffusion or {})
        self.optim = _as(OptimConfig, optim or {})
        self.schedule = _as(ScheduleConfig, schedule or {})
        self.lora = _as(LoraConfig, lora or {}).check("lora")  # rank > 0: adapters added in configure_model
        self.save_hyperparameters({
            "model_config": asdict(self.model_config), "diffusion": asdict(self.diffusion),
            "optim": asdict(self.optim), "schedule": asdict(self.schedule), "seed": seed, "stage": self.stage,
            "lora": asdict(self.lora),
        }, logger=False)  # kept in checkpoints; MLflow gets the whole experiment config instead (tracking.py)
        self.seed, self.lr_scale = seed, lr_scale
        self.model = MaskPredictor(self.model_config)
        enable_activation_checkpointing(self.model, activation_checkpointing)
        if nan_check not in NAN_CHECKS:
            raise ValueError(f"nan_check must be one of {NAN_CHECKS}, got {nan_check!r}")
        # nan_check=deferred: the loss stays on the device; a non-finite one is caught by NonFiniteLossGuard
        # through this flag (the update skipped inside the fused AdamW) and its value read one step later.
        self.finite_flag = DeviceFlag() if nan_check == "deferred" else None
        self._pending_loss = None  # deferred: (step, host copy, event) of the last micro-batch's loss
        # Counted on the device every micro-batch and read only at log steps (callbacks.py: no host sync per
        # step): non-padding tokens, model FLOPs (model/flops.py), and [loss sum, rows] per mask-ratio bin since
        # the last log step. Plain tensors, not buffers: DDP would copy rank 0's buffers into every rank.
        self.tokens_seen = torch.zeros((), dtype=torch.float64)
        self.flops_done = torch.zeros((), dtype=torch.float64)
        self.mask_ratio_loss = torch.zeros(2, MASK_RATIO_BINS, dtype=torch.float64)
        self.last_loss: float | None = None
        self.nonfinite_step: int | None = None
        self._skip_backward = False
        self.last_throughput: float | None = None
        self.tokenizer_json: str | None = None  # embedded in checkpoints so one file restores model + tokenizer
        # (optimizer step, loss) of micro-batches, bounded for million-step runs: the first and the latest.
        self.first_losses: list[tuple[int, float]] = []
        self.recent_losses: deque[tuple[int, float]] = deque(maxlen=1000)

    # ----------------------------------------------------------------- objective
    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _loss(self, batch: dict, generator: torch.Generator):
        return diffusion_loss(
            self.model, batch["input_ids"], mask_token_id=self.model_config.mask_token_id,
            cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
            loss_mask=batch.get("loss_mask"), config=self.diffusion, generator=generator,
        )

    def _count_tokens(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        if self.model_config.pad_token_id == self.model_config.eos_token_id:  # LLaDA pads with EOS: count all
            return torch.tensor(ids.numel(), device=ids.device)
        return (ids != self.model_config.pad_token_id).sum()

    def _train_stream(self, batch_idx: int) -> int:
        """Which noise stream micro-batch `batch_idx` of this rank draws from: its position in the step's
        global batch (micro * world_size + rank, the order in which the data modules deal batches out).

        A global batch split over ranks or over accumulation steps then draws the same masks: 2 FSDP
        processes compute what 1 process accumulating 2 micro-batches does. The seed's trailing 0 (once the
        rank) keeps single-process runs' masks as they always were.
        """
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        return micro * self.trainer.world_size + self.global_rank

    def _count(self, batch: dict, out) -> None:
        """Tokens, model FLOPs and the loss by mask ratio of a micro-batch, added up on the device."""
        tokens = self._count_tokens(batch)
        self.tokens_seen += tokens
        ids = batch["input_ids"]
        self.flops_done += flops_from_counts(self.model_config, tokens.to(torch.float64),
                                             squared_segment_lengths(ids, batch.get("cu_seqlens")),
                                             out.n_masked.to(torch.float64))
        loss_mask = batch.get("loss_mask")
        self.mask_ratio_loss += loss_by_mask_ratio(out.row_loss, out.t, None if loss_mask is None else loss_mask.any(1),
                                                   MASK_RATIO_BINS)

    def training_step(self, batch: dict, batch_idx: int):
        generator = self._generator(mixing_seed(self.seed, self.global_step, self._train_stream(batch_idx), 0))
        out = self._loss(batch, generator)
        # Averaged over ranks: every rank takes the same skip / plateau decision.
        reduced = self.trainer.strategy.reduce(out.loss.detach(), reduce_op="mean")
        if self.finite_flag is not None:  # no host sync: the previous micro-batch's loss is read instead
            self._resolve_pending_loss()
            self._pending_loss = (self.global_step, *_host_copy(reduced))
            self.finite_flag.mark(~torch.isfinite(reduced), self.global_step, kind=1)
        else:
            loss_value = float(reduced)
            self.last_loss = loss_value
            if not math.isfinite(loss_value):
                # Skip backward (`backward` below) and thus the update on every rank alike. Returning None
                # would say the same, but Lightning refuses None under any multi-process strategy.
                self.nonfinite_step, self._skip_backward = self.global_step, True
                return out.loss
            self._record_loss(self.global_step, loss_value)
        self._count(batch, out)
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/masked_fraction", out.masked_fraction.float(), on_step=True, on_epoch=False)
        return out.loss

    def _record_loss(self, step: int, value: float) -> None:
        self.last_loss = value
        if not math.isfinite(value):
            return
        if len(self.first_losses) < 100:
            self.first_losses.append((step, value))
        self.recent_losses.append((step, value))

    def _resolve_pending_loss(self) -> None:
        """nan_check=deferred: record the last micro-batch's loss (its copy finished long ago: no stall)."""
        if self._pending_loss is None:
            return
        step, host, event = self._pending_loss
        if event is not None:
            event.synchronize()
        self._pending_loss = None
        self._record_loss(step, float(host))

    def on_train_end(self) -> None:
        self._resolve_pending_loss()

    def validation_step(self, batch: dict, batch_idx: int):
        # Fixed masks per validation batch: the same seed in every evaluation.
        stream = batch_idx * self.trainer.world_size + self.global_rank  # the global batch index (EvalLoader)
        out = self._loss(batch, self._generator(mixing_seed(self.seed, _VAL_SEED_OFFSET, stream)))
        # Ranks evaluate different shards of the validation set: average over them (a no-op on one device).
        self.log("val/loss", out.loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])
        return out.loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self._skip_backward:  # a non-finite loss: no gradients, so AdamW leaves every parameter as it is
            self._skip_backward = False
            return
        super().backward(loss, *args, **kwargs)

    # ----------------------------------------------------------------- optimisation
    def _sharded(self) -> bool:
        return is_sharded(self.model)

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients: over all shards when parameters are sharded (FSDP2), so every
        rank gets the same number."""
        return global_grad_norm(self.parameters(), self.trainer.strategy if self._sharded() else None, self.device)

    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    def make_scheduler(self, optimizer) -> RecipeLR:
        return RecipeLR(
            optimizer, kind="pretrain", peak_lr=self.optim.lr, min_lr=self.optim.min_lr,
            warmup_steps=self.optim.warmup_steps, decay_steps=self.schedule.decay_steps,
            switch_step=self.schedule.switch_at_step, lr_scale=self.lr_scale,
        )

    def configure_optimizers(self):
        if self._sharded():
            reshard(self.model)
        params = next(self.parameters())
        fused = self.optim.fused if self.optim.fused is not None else params.is_cuda
        optimizer = torch.optim.AdamW(
            weight_decay_groups(self.model, self.optim.weight_decay), lr=self.optim.lr,
            betas=tuple(self.optim.betas), eps=self.optim.eps, fused=fused,
        )
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip with a fused optimizer because fused AdamW
        # unscales fp16 gradients itself; with bf16 or fp32 there is no scaler, so plain clipping is exact.
        # Sharded (FSDP2) gradients are clipped by their global norm over all shards (the same on every rank).
        if not gradient_clip_val:
            return
        if self._sharded():
            torch.nn.utils.clip_grads_with_norm_(list(self.parameters()), gradient_clip_val, self.grad_norm())
        elif getattr(self.trainer.precision_plugin, "scaler", None) is None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        # Called by Lightning on every rank before the optimizers exist; FSDP2Strategy shards here
        # (per block + root, training/strategy.py). Other strategies keep the plain model. LoRA adapters
        # (training/lora.py) go in first, the same on every rank, so they are sharded with their blocks.
        add_adapters(self.model, self.lora, seed=self.seed)
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model)

    def on_fit_start(self) -> None:
        # Lightning moves parameters and buffers to the device; the counters follow here, before any
        # callback's on_train_start reads them.
        for name in ("tokens_seen", "flops_done", "mask_ratio_loss"):
            setattr(self, name, getattr(self, name).to(self.device))

    def on_train_start(self) -> None:
        # After a checkpoint restore: a rollback after a non-finite loss asks for a lower LR than the saved one.
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, RecipeLR) and config.scheduler.lr_scale != self.lr_scale:
                config.scheduler.set_lr_scale(self.lr_scale)
        # Lightning #20550: SFT's schedule length (`estimated_stepping_batches`) builds the train loader before a
        # resumed run's loader position is restored, and Lightning then never loads it (SFT resumed mid-epoch
        # replayed the epoch from its first batch). Load it now: a no-op unless resuming; our ResumableLoader
        # reads its position at the first batch, after this hook.
        load_loader_states = getattr(self.trainer.fit_loop, "_load_combined_loader_states", None)
        if load_loader_states is not None:
            load_loader_states()

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        lora = adapter_settings(self.model)  # the weights hold adapters: say which (model/lora.py)
        checkpoint["illada"] = {"model_config": asdict(self.model_config), "stage": self.stage,
                                "tokenizer_json": self.tokenizer_json, "lora": asdict(lora) if lora else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resumed_lora(checkpoint, self.lora)


class PretrainModule(DiffusionLMModule):
    """iLLaDA §2.1: warmup, constant, cosine decay after the plateau switch."""

    stage = "pretrain"


class SFTModule(DiffusionLMModule):
    """iLLaDA §2.2: warmup to the peak, constant, linear decay over the last `decay_fraction` of steps."""

    stage = "sft"

    def make_scheduler(self, optimizer) -> RecipeLR:
        return RecipeLR(
            optimizer, kind="sft", peak_lr=self.optim.lr, min_lr=self.optim.min_lr,
            warmup_steps=self.optim.warmup_steps, total_steps=self.total_steps(),
            decay_fraction=self.schedule.decay_fraction, lr_scale=self.lr_scale,
        )
