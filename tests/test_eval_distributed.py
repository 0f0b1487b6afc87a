"""Sharded evaluation over two gloo processes gathers to the single-process numbers (the callback's DDP/FSDP path)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from illada_lightning.evaluation import EvalConfig, evaluate
from tests.test_eval_runner import CharTokenizer, FakeModel, PickChoice, arc_file


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, path, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": path})
        scorer = PickChoice(1)
        results = evaluate(FakeModel(), CharTokenizer(), None, cfg, scorer=scorer, subset_size=7, rank=rank,
                           world_size=world_size)
        queue.put((rank, sum(len(c) for c in scorer.calls), results["arc_challenge"]))
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_gathers_to_the_single_process_result(tmp_path):
    path = str(arc_file(tmp_path, n=10))
    cfg = EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": path})
    single = evaluate(FakeModel(), CharTokenizer(), None, cfg, scorer=PickChoice(1), subset_size=7)["arc_challenge"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(2, _free_port(), path, queue), nprocs=2, join=True)
    got = sorted(queue.get(timeout=30) for _ in range(2))
    assert [n for _, n, _ in got] == [4, 3]  # each rank scored its own shard of the 7-example subset
    for _, _, metrics in got:
        for key in ("acc", "acc_stderr", "acc_norm", "n"):
            assert metrics[key] == single[key]


def _fsdp_worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(rank)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from illada_lightning import build_model
        from illada_lightning.evaluation.callback import unsharded_copy
        from illada_lightning.model.transformer import Block

        torch.manual_seed(0)
        model = build_model("tiny", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=512,
                            max_seq_len=64)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        holder = torch.nn.Module()
        holder.model = model
        policy = ModuleWrapPolicy({Block})
        root = FSDP(holder, auto_wrap_policy=policy, device_id=rank, use_orig_params=True)
        copy = unsharded_copy(root, model.config, torch.device("cuda", rank))
        same = all(torch.equal(copy.state_dict()[k].cpu(), v) for k, v in reference.items())
        ids = torch.randint(4, 512, (1, 16), device=f"cuda:{rank}")
        logits = copy(ids)  # no collectives: ranks may run different numbers of forwards
        from illada_lightning.evaluation.metrics import accuracy_with_stderr

        gathered = accuracy_with_stderr([True] if rank == 0 else [False, False], "acc", sync=True)  # over NCCL
        queue.put((rank, same, tuple(logits.shape), round(gathered["acc"], 6), gathered["n"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_unsharded_copy_has_the_full_weights_on_every_rank_and_metrics_gather_over_nccl():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    got = sorted(queue.get(timeout=60) for _ in range(2))
    assert got == [(0, True, (1, 16, 512), 0.333333, 3), (1, True, (1, 16, 512), 0.333333, 3)]
