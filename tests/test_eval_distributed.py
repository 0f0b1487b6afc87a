"""Sharded evaluation over two gloo processes gathers to the single-process numbers (the callback's DDP/FSDP path)."""

import os
import socket

import pytest
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


@pytest.mark.slow
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
