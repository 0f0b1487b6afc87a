"""The strategy factory: what each name builds, and the FSDP2 sharding plan on one process (the two-process
runs are in test_fsdp_cpu.py, GPU runs in test_training_gpu.py)."""

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from illada_lightning import build_model
from illada_lightning.training.module import global_grad_norm
from illada_lightning.training.strategy import (
    FSDP2Strategy,
    make_strategy,
    param_dtype_for,
    shard_model,
    world_size,
)


def test_auto_and_ddp_on_cpu():
    assert make_strategy("auto", "cpu", "1") == "auto"
    ddp = make_strategy("ddp", "cpu", "2")
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    assert world_size("cpu", "2", 3) == 6 and world_size("cpu", "0,1", 1) == 2


def test_fsdp_is_fsdp2_over_a_data_parallel_mesh():
    fsdp = make_strategy("fsdp", "cpu", "2", 2)
    assert isinstance(fsdp, FSDP2Strategy) and isinstance(fsdp, ModelParallelStrategy)
    assert (fsdp._data_parallel_size, fsdp._tensor_parallel_size) == (4, 1)  # all ranks shard, no TP
    assert fsdp._save_distributed_checkpoint and fsdp._process_group_backend == "gloo"
    assert fsdp.param_dtype is None and not fsdp.cpu_offload  # fp32 on CPU


def test_mixed_precision_policy_follows_precision_and_device(monkeypatch):
    assert param_dtype_for("bf16-mixed", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert param_dtype_for("bf16-mixed", "gpu") == torch.bfloat16 and param_dtype_for("32-true", "gpu") is None
    fsdp = make_strategy("fsdp", "gpu", "2", precision="bf16-mixed", cpu_offload=True)
    assert fsdp._process_group_backend == "nccl" and fsdp.param_dtype == torch.bfloat16 and fsdp.cpu_offload


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_shard_model_shards_every_block_and_the_root_and_keeps_the_numbers(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from illada_lightning.diffusion.objective import diffusion_loss

    model = build_model("tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128,
                        max_seq_len=32)
    plain = build_model("tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128,
                        max_seq_len=32)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    shard_model(model, init_device_mesh("cpu", (1,)))
    assert shard_model(model, None) is model  # idempotent: configure_model runs for every fit/validate
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.blocks)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]  # same names
    losses = []
    for m in (model, plain):  # the objective goes through `hidden_states` + `output_weight`, not forward
        out = diffusion_loss(m, ids, mask_token_id=m.config.mask_token_id, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        losses.append((float(out.loss.detach()), float(global_grad_norm(m.parameters()))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_an_optimizer_built_on_unsharded_parameters_is_prevented(one_process_group):
    """On one H100 with fsdp_cpu_offload=true the optimizer was built while the root's parameters were registered
    unsharded (bf16 CUDA tensors instead of the fp32 shards; the embedding and final norm), and saving its state
    failed (`KeyError: 0` in get_optimizer_state_dict). That state is made here with `unshard()` (a CPU forward
    reshards the root again); `reshard` (called by configure_optimizers) registers the shards before the
    optimizer sees the parameters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from illada_lightning.training.strategy import reshard

    model = build_model("tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128,
                        max_seq_len=32)
    shard_model(model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16)  # bf16-mixed, as on the GPU
    model.unshard()
    assert [n for n, p in model.named_parameters() if not isinstance(p, DTensor)] == ["embed.weight", "norm.weight"]
    stale = {id(p) for p in model.parameters()}
    reshard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # What an optimizer built before the reshard would hold: two tensors the model no longer has (KeyError: 0).
    assert len(stale - {id(p) for p in model.parameters()}) == 2
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert len(get_optimizer_state_dict(model, optimizer)["state"]) == len(list(model.parameters()))


def test_bf16_true_shards_bf16_parameters(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh

    strategy = FSDP2Strategy(1, backend="gloo", store_bf16=True)
    strategy._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = build_model("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128,
                        max_seq_len=32)
    strategy.shard(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # AdamW state follows: 8 B/parameter
