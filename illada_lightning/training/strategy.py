"""One strategy factory for both training stages: `auto`, `ddp` or `fsdp` (Lightning's own engines).

FSDP choice: Lightning's `FSDPStrategy` (FSDP1) with `auto_wrap_policy={Block}` rather than
`ModelParallelStrategy` + FSDP2 `fully_shard`. Reasons:
- `FSDPStrategy` is a drop-in Trainer strategy: the same LightningModule, optimizer set-up and
  checkpoint hooks serve `auto`, `ddp` and `fsdp`; ModelParallelStrategy requires the module to shard
  itself in `configure_model` over a device mesh (a second code path to keep in sync with the first).
- Sharded checkpoints (`state_dict_type="sharded"`, torch.distributed.checkpoint) resume through
  Lightning's usual `ckpt_path`, and `lightning.pytorch.utilities.consolidate_checkpoint` turns them into
  one file; `checkpoint.load_checkpoint` reads either.
- `use_orig_params=True` keeps the original parameters visible, so the weight-decay parameter groups
  (matrices vs. norm gains) work unchanged.
Lightning refuses FSDPStrategy without CUDA (`accelerator=cpu` raises in its accelerator connector), so
`strategy=fsdp` needs at least two CUDA devices; the CPU tests run DDP with two gloo processes instead.
FSDP2 would give per-parameter (DTensor) sharding and simpler mixed precision; switching is a change in
this file only.

Activation checkpointing is applied by the module (`module.enable_block_checkpointing`, per block) for
every strategy, so parameter names - and thus checkpoints - are identical with and without it.

Multi-node: set `num_nodes` and `devices` (GPUs per node) and launch one process per GPU with torchrun
(`torchrun --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT -m experiments.run ...`) or under SLURM
(`srun python -m experiments.run ...` with `--ntasks-per-node=G`); Lightning reads the environment.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from ..model.transformer import Block


class StrategyError(ValueError):
    """A strategy that cannot run on this machine (raised before training starts)."""


def _device_count(accelerator: str, devices: str) -> int:
    """How many devices per node `devices` asks for ("auto", "N", "-1", "0,1")."""
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
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


def check_strategy(strategy: str, accelerator: str, devices: str, num_nodes: int) -> None:
    """Refuse, with the reason, a strategy this machine cannot run."""
    if strategy not in ("auto", "ddp", "fsdp"):
        raise StrategyError(f"strategy must be auto, ddp or fsdp, got {strategy!r}")
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise StrategyError(f"accelerator={accelerator} but CUDA is not available on this machine")
    n = _device_count(accelerator, devices)
    if use_cuda and n > torch.cuda.device_count():
        raise StrategyError(f"devices={devices} asks for {n} GPUs but this machine has {torch.cuda.device_count()}")
    if strategy == "fsdp" and not use_cuda:
        raise StrategyError(
            "strategy=fsdp needs CUDA GPUs (Lightning's FSDPStrategy does not run on accelerator=cpu; "
            + ("this machine has no CUDA device" if not torch.cuda.is_available() else f"accelerator={accelerator}")
            + "); use strategy=ddp or strategy=auto on CPU"
        )
    if strategy == "fsdp" and n * num_nodes < 2:
        raise StrategyError(
            f"strategy=fsdp shards the model over several processes but devices={devices} x num_nodes={num_nodes} "
            f"gives {n * num_nodes} ({'CUDA GPUs' if use_cuda else 'CPU processes; no CUDA on this machine'}); "
            "use strategy=auto for one device, or devices=N (N >= 2)"
        )


def make_strategy(strategy: str, accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1) -> Strategy | str:
    """The Lightning strategy object for the Trainer (checked first)."""
    check_strategy(strategy, accelerator, devices, num_nodes)
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if strategy == "ddp":
        # static_graph: the same parameters take part in every step.
        return DDPStrategy(process_group_backend=backend, static_graph=True)
    if strategy == "fsdp":
        return FSDPStrategy(
            auto_wrap_policy={Block},  # one FSDP unit per Transformer block (+ the root: embedding, final norm)
            sharding_strategy="FULL_SHARD",
            state_dict_type="sharded",
            use_orig_params=True,
            limit_all_gathers=True,
            process_group_backend=backend,
        )
    return "auto"
