"""The strategy factory: what each name builds (the FSDP run itself needs two GPUs: test_training_gpu.py)."""

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from illada_lightning.model.transformer import Block
from illada_lightning.training.strategy import make_strategy, world_size


def test_auto_and_ddp_on_cpu():
    assert make_strategy("auto", "cpu", "1") == "auto"
    ddp = make_strategy("ddp", "cpu", "2")
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    assert world_size("cpu", "2", 3) == 6 and world_size("cpu", "0,1", 1) == 2


def test_fsdp_wraps_each_block_with_sharded_checkpoints(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    fsdp = make_strategy("fsdp", "gpu", "2")
    assert isinstance(fsdp, FSDPStrategy)
    assert fsdp._state_dict_type == "sharded" and fsdp._process_group_backend == "nccl"
    assert fsdp.kwargs["use_orig_params"] is True  # weight-decay groups over the original parameters
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert Block in policy._module_classes
