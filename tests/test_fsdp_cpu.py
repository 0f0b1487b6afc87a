"""`strategy=fsdp` (FSDP2 through Lightning's ModelParallelStrategy) on two gloo CPU processes.

One two-process run (pretraining then SFT with per-epoch evaluation, `tests/fsdp_worker.py`) is compared with
one process accumulating the same global batch: per-step losses and gradient norms (before clipping, the
norm the clip uses), the plateau switch, the final weights. Then: the exported model reproduces the sharded
model's logits; the sharded checkpoint reads on one process; per-epoch evaluation equals a single-process
evaluation of the same weights; a run killed on every rank resumes (`resume=auto`) onto the uninterrupted
losses; a resume on another world size is refused with the reason; a NaN on one rank stops, or rolls back,
every rank at the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fsdp_worker import main as worker_main
from tests.fsdp_worker import probe_ids

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
    "model.vocab_size=512", "model.max_seq_len=64", "tokenizer.vocab_size=512", "progress_bar=false",
    "pretrain.data.max_seq_len=null", "sft.data.max_seq_len=null", "mlflow.enabled=false", "accelerator=cpu",
]
# Pretraining: 6 steps of a global batch of 8 rows, checkpoints every 3 steps, clipping active (norms ~1.4-2.8
# > 1.5) and a plateau detector that fires within the run (min_delta larger than any improvement).
PRETRAIN = [
    "pretrain.max_steps=6", "pretrain.ckpt_every_n_steps=3", "pretrain.val_every_n_steps=0",
    "pretrain.optim.grad_clip=1.5", "pretrain.optim.warmup_steps=2", "pretrain.schedule.min_steps=0",
    "pretrain.schedule.patience=2", "pretrain.schedule.min_delta=5.0", "pretrain.schedule.decay_steps=4",
]
STEPS = 6
EVAL = ["eval.per_epoch=true", "eval.tasks=[cloze,synthetic]", "eval.subset_size=6", "eval.cloze_items=12",
        "eval.cloze_context_words=12", "eval.cloze_continuation_words=4", "eval.sampler.gen_length=4",
        "eval.sampler.block_length=4", "eval.sampler.steps=4"]


def _cloze_text() -> str:
    return str(REPO / "data" / "corpus" / "valid.txt")


def two_processes(out: Path, root: Path, cache: Path, *args: str, flags=()) -> subprocess.CompletedProcess:
    """The worker on two FSDP2 gloo processes (Lightning launches the second one)."""
    command = [sys.executable, "-m", "tests.fsdp_worker", str(out), *flags, *TINY, *args, f"runs_root={root}",
               f"pretrain.data.cache_dir={cache}", f"sft.data.cache_dir={cache}", "strategy=fsdp", "devices=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    from illada_lightning.data.synthetic import make_arithmetic_examples

    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make_arithmetic_examples(32, seed=0)))
    return path


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, sft_file):
    """Pretraining (6 steps) then one SFT epoch with per-epoch evaluation, on two FSDP2 processes."""
    root = tmp_path_factory.mktemp("fsdp")
    proc = two_processes(root / "out", root, root / "cache", "name=fsdp", "stage=all", *PRETRAIN, *EVAL,
                         "pretrain.batch_size=4", "pretrain.limit_val_batches=1", "sft.batch_size=4",
                         "sft.epochs=1", "sft.max_steps=-1", f"sft.data.train_files=[{sft_file}]",
                         "sft.data.val_files=[]", "sft.val_every_n_steps=0", f"eval.data.cloze={_cloze_text()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The same pretraining on one process, accumulating the same global batch (2 micro-batches of 4)."""
    root = tmp_path_factory.mktemp("single")
    worker_main([str(root / "out"), *TINY, *PRETRAIN, f"runs_root={root}", f"pretrain.data.cache_dir={root / 'c'}",
                 "name=single", "stage=pretrain", "strategy=auto", "devices=1", "pretrain.batch_size=4",
                 "pretrain.accumulate_grad_batches=2", "pretrain.limit_val_batches=2"])
    return root


def test_two_fsdp_processes_train_like_one_process_step_for_step(fsdp_run, one_process_run):
    fsdp = ranks(fsdp_run / "out")
    single = json.loads((one_process_run / "out" / "rank0.json").read_text())["record"]["pretrain"]
    a, b = fsdp[0]["record"]["pretrain"], fsdp[1]["record"]["pretrain"]
    assert a == b  # every rank saw the same (rank-averaged) losses, norms and decisions
    # One process logs each micro-batch; the two processes log their average.
    per_step = [(single["losses"][i][1] + single["losses"][i + 1][1]) / 2 for i in range(0, 2 * STEPS, 2)]
    assert len(a["losses"]) == STEPS
    assert [v for _, v in a["losses"]] == pytest.approx(per_step, abs=1e-5)
    assert [v for _, v in a["grad_norms"]] == pytest.approx([v for _, v in single["grad_norms"]], rel=1e-5)
    assert max(v for _, v in a["grad_norms"]) > 1.5  # the clip at 1.5 was active
    assert a["switch_step"] is not None and a["switch_step"] == single["switch_step"]
    f_summary = fsdp[0]["stages"]["pretrain"]
    s_summary = json.loads((one_process_run / "out" / "rank0.json").read_text())["stages"]["pretrain"]
    assert f_summary["val_loss"] == pytest.approx(s_summary["val_loss"], abs=1e-5)
    w_fsdp = torch.load(fsdp_run / "fsdp" / "pretrain" / "model.pt", weights_only=False)["state_dict"]
    w_single = torch.load(one_process_run / "single" / "pretrain" / "model.pt", weights_only=False)["state_dict"]
    assert set(w_fsdp) == set(w_single)
    for k in w_single:
        torch.testing.assert_close(w_fsdp[k], w_single[k], rtol=1e-4, atol=1e-5)


def test_export_and_sharded_checkpoint_load_without_distributed_setup(fsdp_run):
    from illada_lightning.checkpoint import load_checkpoint

    ckpt = fsdp_run / "fsdp" / "pretrain" / "checkpoints" / f"step={STEPS:07d}.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # complete: DCP writes .metadata last
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    exported, tokenizer = load_checkpoint(fsdp_run / "fsdp" / "sft" / "model.pt")
    assert tokenizer is not None
    with torch.no_grad():
        logits = exported(probe_ids(exported.config.vocab_size))
    sharded_logits = torch.load(fsdp_run / "out" / "logits.pt")  # the SFT model, forward through its shards
    torch.testing.assert_close(logits, sharded_logits, rtol=1e-5, atol=1e-5)
    from_shards, _ = load_checkpoint(ckpt)  # consolidated on this one process
    pre, _ = load_checkpoint(fsdp_run / "fsdp" / "pretrain" / "model.pt")
    for k, v in pre.state_dict().items():
        assert torch.equal(from_shards.state_dict()[k], v), k


def test_per_epoch_evaluation_under_fsdp_equals_single_process_evaluation(fsdp_run):
    from illada_lightning.checkpoint import load_checkpoint
    from illada_lightning.config import load_config
    from illada_lightning.evaluation import evaluate
    from illada_lightning.experiment.config import ExperimentConfig

    a, b = (r["record"]["sft"]["eval"] for r in ranks(fsdp_run / "out"))
    assert a == b and [epoch for epoch, _ in a] == [1]
    cfg = load_config(ExperimentConfig, REPO / "experiments" / "configs" / "default.yaml",
                      [*EVAL, f"eval.data.cloze={_cloze_text()}"]).eval
    model, tokenizer = load_checkpoint(fsdp_run / "fsdp" / "sft" / "model.pt")  # the weights after epoch 1
    results = evaluate(model, tokenizer, cfg.tasks, cfg, subset_size=cfg.subset_size)
    single = {f"eval/{t}/{k}": float(v) for t, vals in results.items() for k, v in vals.items() if k != "seconds"}
    assert a[0][1] == single
    assert single["eval/cloze/n"] == 6 and single["eval/synthetic/n"] == 6


def test_killed_sharded_run_resumes_onto_the_uninterrupted_losses(fsdp_run, tmp_path):
    common = ["name=cut", "stage=pretrain", *PRETRAIN, "pretrain.batch_size=4", "pretrain.data.val_files=[]"]
    cache = fsdp_run / "cache"
    killed = two_processes(tmp_path / "killed", tmp_path, cache, *common, flags=["--kill-at", "4"])
    assert killed.returncode != 0
    ckpts = tmp_path / "cut" / "pretrain" / "checkpoints"
    assert (ckpts / "step=0000003.ckpt" / ".metadata").is_file()
    assert not (tmp_path / "cut" / "pretrain" / "FINISHED").exists()

    resumed = two_processes(tmp_path / "resumed", tmp_path, cache, *common, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    full = ranks(fsdp_run / "out")[0]["record"]["pretrain"]
    again = ranks(tmp_path / "resumed")[0]["record"]["pretrain"]
    assert [s for s, _ in again["losses"]] == [4, 5, 6]
    assert [v for _, v in again["losses"]] == pytest.approx([v for _, v in full["losses"][3:]], abs=1e-6)
    assert again["switch_step"] == full["switch_step"]
    w_full = torch.load(fsdp_run / "fsdp" / "pretrain" / "model.pt", weights_only=False)["state_dict"]
    w_cut = torch.load(tmp_path / "cut" / "pretrain" / "model.pt", weights_only=False)["state_dict"]
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(fsdp_run, tmp_path):
    args = ["name=nan", "stage=pretrain", *PRETRAIN, "pretrain.batch_size=4", "pretrain.data.val_files=[]"]
    proc = two_processes(tmp_path / "out", tmp_path, fsdp_run / "cache", *args, flags=["--nan-at", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = ranks(tmp_path / "out")
    for r in (a, b):
        assert r["error"].startswith("NonFiniteLossError: training stopped: the loss became non-finite at step 2")
        assert r["record"]["pretrain"]["nonfinite_step"] == 2
    assert a["record"] == b["record"]
    saved = tmp_path / "nan" / "pretrain" / "checkpoints" / "nonfinite-step=0000002.ckpt"
    assert (saved / ".metadata").is_file()  # all weights finite on every shard, saved by every rank


def test_nonfinite_loss_on_one_rank_rolls_every_rank_back_to_the_sharded_checkpoint(fsdp_run, tmp_path):
    args = ["name=rb", "stage=pretrain", *PRETRAIN, "pretrain.batch_size=4", "pretrain.data.val_files=[]",
            "on_nan=rollback"]
    proc = two_processes(tmp_path / "out", tmp_path, fsdp_run / "cache", *args, flags=["--nan-at", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = ranks(tmp_path / "out")
    assert a["record"] == b["record"] and a["stages"]["pretrain"]["rollbacks"] == 1
    steps = [s for s, _ in a["record"]["pretrain"]["losses"]]
    assert steps[:4] == [1, 2, 3, 4] and steps[-3:] == [4, 5, 6]  # back to step 3, then on to the end
    full = ranks(fsdp_run / "out")[0]["record"]["pretrain"]["losses"]
    assert a["record"]["pretrain"]["losses"][-3][1] == pytest.approx(full[3][1], abs=1e-6)  # reloaded exactly


def test_resume_on_another_world_size_is_refused_with_the_reason(fsdp_run, tmp_path):
    """DCP could reshard the weights, but the data position is per rank layout: refused, nothing lost."""
    import shutil

    src = fsdp_run / "fsdp"
    ckpts = tmp_path / "other" / "pretrain" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(src / "pretrain" / "checkpoints" / f"step={STEPS:07d}.ckpt", ckpts / f"step={STEPS:07d}.ckpt")
    (ckpts / "last.ckpt").symlink_to(f"step={STEPS:07d}.ckpt")
    shutil.copytree(src / "tokenizer", tmp_path / "other" / "tokenizer")
    out = tmp_path / "out"
    env = dict(os.environ)
    try:  # one FSDP2 process, here: its process group and Lightning's environment variables are undone after
        worker_main([str(out), *TINY, *PRETRAIN, "pretrain.max_steps=8", f"runs_root={tmp_path}", "name=other",
                     f"pretrain.data.cache_dir={fsdp_run / 'cache'}", "stage=pretrain", "strategy=fsdp",
                     "devices=1", "pretrain.batch_size=4", "pretrain.limit_val_batches=1", "resume=auto"])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    error = json.loads((out / "rank0.json").read_text())["error"]
    assert "cannot resume the data loader: checkpoint has world_size=2, this run has world_size=1" in error
    assert (ckpts / f"step={STEPS:07d}.ckpt" / ".metadata").is_file()
    assert not (tmp_path / "other" / "pretrain" / "FINISHED").exists()
