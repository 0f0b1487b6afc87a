"""One strategy factory for both training stages: `auto`, `ddp` or `fsdp` (Lightning's own engines).

`strategy=fsdp` is FSDP2 (`torch.distributed.fsdp.fully_shard`, per-parameter DTensor sharding) driven by
Lightning's `ModelParallelStrategy` over a 1-D data-parallel mesh (`data_parallel_size` = world size,
`tensor_parallel_size=1`). `FSDP2Strategy.shard` is called from `DiffusionLMModule.configure_model`:
- `fully_shard` on every Transformer block, then on the root (embedding, final norm, LM head);
- mixed precision: bf16 parameters for compute with fp32 gradient reduction on GPU when `precision` is
  bf16; fp32 throughout on CPU (gloo) or with `precision=32-true`;
- `precision=bf16-true`: the model is cast to bf16 before sharding (weights, gradients, AdamW state: 8 B
  per parameter instead of 16, how `illada_8b` fits one GPU); LoRA adapters (added by the module before
  sharding, so sharded with their blocks) stay fp32 and are the only trainable parameters, which is all
  FSDP2 asks of a parameter group's dtypes (uniform among trainable parameters);
- optional CPU offload of parameters, gradients and optimizer state (`fsdp_cpu_offload=true`, GPU only);
- activation checkpointing and `torch.compile` stay per block, applied by the module before sharding
  (`checkpointing.enable_activation_checkpointing`, `MaskPredictor.compile_blocks`), so parameter names - and thus
  checkpoints - are the same with and without them.
It runs on CPU with gloo (tested with two processes) and on GPUs with NCCL, any `devices` / `num_nodes`,
including `devices=1` (one shard; the same code path as many). Refused before training, with the reason:
`precision=16-mixed` (fp16 needs a gradient scaler, which FSDP2 through Lightning does not support) and
`fsdp_cpu_offload` on CPU.

FSDP1 (`FSDPStrategy`) is dropped: it refuses `accelerator=cpu`, so it could never be tested where CI runs,
and one sharded path is easier to keep right than two.

Checkpoints under `strategy=fsdp` are directories (torch.distributed.checkpoint, one shard file per rank,
plus Lightning's `meta.pt`); a directory is complete only once DCP's `.metadata` exists (DCP writes it last).
Resume on the same world size continues exactly. DCP itself can load shards into another world size (the
weights of a two-rank checkpoint are read on one process by `checkpoint.load_checkpoint`), but
`resume=auto` on a *different* world size is refused by the data loader,
whose saved position is per rank layout (`EpochBatchSampler.load_state_dict` names the mismatch): continue
such a run with `init_from` (SFT) or the exported weights instead.

Multi-node: set `num_nodes` and `devices` (GPUs per node) and launch one process per GPU with torchrun
(`torchrun --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT -m experiments.run ...`) or under SLURM
(`srun python -m experiments.run ...` with `--ntasks-per-node=G`); Lightning reads the environment.
"""

from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from ..model.lora import to_storage_dtype

STRATEGY_NAMES = ("auto", "ddp", "fsdp")
# Lightning's ModelParallelStrategy refuses fp16 with a gradient scaler (16-mixed); the others shard.
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")


log = logging.getLogger(__name__)


class StrategyError(ValueError):
    """A strategy that cannot run on this machine (raised before training starts)."""


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _device_count(accelerator: str, devices: str) -> int:
    """How many devices per node `devices` asks for ("auto", "N", "-1", "0,1")."""
    use_cuda = _uses_cuda(accelerator)
    available = torch.cuda.device_count() if use_cuda else (os.cpu_count() or 1)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return available if use_cuda else 1
    if "," in text or text.startswith("["):
        return len([d for d in text.strip("[]").split(",") if d.strip()])
    try:
        return int(text)
    except ValueError:
        raise StrategyError(f"devices={devices!r} is not 'auto', a count or a comma-separated list") from None


def world_size(accelerator: str, devices: str, num_nodes: int) -> int:
    return _device_count(accelerator, devices) * num_nodes


def check_strategy(strategy: str, accelerator: str, devices: str, num_nodes: int, *,
                   precision: str = "32-true", cpu_offload: bool = False) -> None:
    """Refuse, with the reason, a strategy or sharding option this machine cannot run."""
    if strategy not in STRATEGY_NAMES:
        raise StrategyError(f"strategy must be auto, ddp or fsdp, got {strategy!r}")
    use_cuda = _uses_cuda(accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise StrategyError(f"accelerator={accelerator} but CUDA is not available on this machine")
    n = _device_count(accelerator, devices)
    if use_cuda and n > torch.cuda.device_count():
        raise StrategyError(f"devices={devices} asks for {n} GPUs but this machine has {torch.cuda.device_count()}")
    if cpu_offload and strategy != "fsdp":
        raise StrategyError(f"fsdp_cpu_offload=true needs strategy=fsdp (got strategy={strategy})")
    if strategy != "fsdp":
        return
    if precision not in FSDP_PRECISIONS:
        raise StrategyError(
            f"strategy=fsdp cannot shard with precision={precision}: fp16 needs a gradient scaler, which "
            f"FSDP2 through Lightning's ModelParallelStrategy does not support; use one of {FSDP_PRECISIONS}")
    if cpu_offload and not use_cuda:
        raise StrategyError("fsdp_cpu_offload=true offloads GPU memory to the host, but this run is on CPU "
                            f"(accelerator={accelerator}{', no CUDA device' if not torch.cuda.is_available() else ''})"
                            "; drop fsdp_cpu_offload")


def param_dtype_for(precision: str, accelerator: str) -> torch.dtype | None:
    """FSDP2 compute dtype of the parameters: bf16 on GPU with a bf16 precision, else None (keep fp32)."""
    if not precision.startswith("bf16"):
        return None
    if not _uses_cuda(accelerator):
        log.info("strategy=fsdp on CPU: parameters are gathered and reduced in fp32 (precision=%s still applies "
                 "Lightning's autocast)", precision)
        return None
    return torch.bfloat16


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure FSDP2 data parallelism, with this project's sharding plan (`shard`)."""

    def __init__(self, world: int, *, backend: str, param_dtype: torch.dtype | None = None,
                 cpu_offload: bool = False, store_bf16: bool = False):
        super().__init__(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=backend)
        self.param_dtype, self.cpu_offload, self.store_bf16 = param_dtype, cpu_offload, store_bf16

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        # The offloaded shards stay in host memory (FSDP2 copies each to the GPU when its block runs); moving
        # the module would undo the offload, so only buffers (e.g. the token counter) go to the device.
        for module in self.model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.root_device)

    def shard(self, model: torch.nn.Module) -> None:
        if self.store_bf16 and not is_sharded(model):
            # precision=bf16-true: cast before sharding, so the shards (and AdamW state) are bf16 from the start
            # (Lightning's own cast comes after configure_model and would then be a no-op).
            to_storage_dtype(model, torch.bfloat16)  # LoRA adapters stay fp32 (model/lora.py)
        shard_model(model, self.device_mesh["data_parallel"], param_dtype=self.param_dtype,
                    cpu_offload=self.cpu_offload)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter or gradient); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters. The root keeps its parameters unsharded after a forward
    (reshard_after_forward=False); an optimizer built then would hold those temporary unsharded tensors (measured
    with fsdp_cpu_offload=true on one H100: the embedding and final norm, and a checkpoint's optimizer state then
    fails with `KeyError: 0` in `get_optimizer_state_dict`)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_model(model: torch.nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                cpu_offload: bool = False) -> torch.nn.Module:
    """`fully_shard` each block of a `MaskPredictor`, then the root (idempotent: a sharded model is kept)."""
    if is_sharded(model):  # configure_model runs again for every fit / validate on the same module
        return model
    # Gradients are reduced in fp32 even when computed in bf16 (as LLaDA's mixed precision keeps fp32 masters).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # The root keeps its parameters gathered after forward: the loss reads `output_weight` (the tied
    # embedding) outside `forward`, after `hidden_states` returns, and backward needs them right away anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    # The objective calls `hidden_states`, not `forward`: FSDP must gather around it too.
    register_fsdp_forward_method(model, "hidden_states")
    return model


def make_strategy(strategy: str, accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1, *,
                  precision: str = "32-true", cpu_offload: bool = False) -> Strategy | str:
    """The Lightning strategy object for the Trainer (checked first)."""
    check_strategy(strategy, accelerator, devices, num_nodes, precision=precision, cpu_offload=cpu_offload)
    backend = "nccl" if _uses_cuda(accelerator) else "gloo"
    if strategy == "ddp":
        # static_graph: the same parameters take part in every step.
        return DDPStrategy(process_group_backend=backend, static_graph=True)
    if strategy == "fsdp":
        return FSDP2Strategy(world_size(accelerator, devices, num_nodes), backend=backend,
                             param_dtype=param_dtype_for(precision, accelerator), cpu_offload=cpu_offload,
                             store_bf16=precision == "bf16-true")
    return "auto"
