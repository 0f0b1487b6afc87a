"""LoRA SFT end to end on CPU (issue 26): `init_from=` a released-style Hugging Face directory, MLflow, the
per-epoch evaluation, resume=auto, the merged exports, FSDP2 on two processes and a multirun over the rank.
The directory is tests/test_hf_init_from.py's tiny LLaDA-layout checkpoint (its own tokenizer and special ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

import illada_lightning as il
from experiments.export import main as export_main
from experiments.run import main as run_main
from illada_lightning.config import load_config
from illada_lightning.experiment.config import ExperimentConfig
from illada_lightning.experiment.run import run_experiment
from illada_lightning.model.lora import LoraError, adapted_parameter_counts, add_adapters, is_adapter_param
from illada_lightning.model.lora_config import LoraConfig
from illada_lightning.sweeps.study import open_storage
from tests.test_hf_init_from import llada_dir, run_args  # noqa: F401  (llada_dir: a module-scoped fixture)
from tests.test_run_experiment import DEFAULT_YAML, SimulatedCrash, StopAt

pytestmark = pytest.mark.slow  # real (tiny) trainings
REPO = Path(__file__).resolve().parents[1]
LORA = ["sft.lora.rank=4", "sft.lora.alpha=8"]
# Two epochs of 4 steps (48 examples packed into 8-row batches), a checkpoint every 2 steps, an evaluation after each epoch.
SFT = ["stage=sft", "sft.epochs=2", "sft.max_steps=-1", "sft.optim.lr=3e-3", "sft.optim.warmup_steps=1",
       "sft.val_every_n_steps=0", "sft.ckpt_every_n_steps=2"]
EVAL = ["eval.per_epoch=true", "eval.tasks=[cloze]", "eval.subset_size=4", "eval.cloze_items=8",
        "eval.cloze_context_words=8", "eval.cloze_continuation_words=2"]


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(11))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(probe(model.config.vocab_size))


def adapted_from(ckpt: Path):
    """The adapted model of a Lightning checkpoint, unmerged: base + peft adapters, as trained."""
    raw = torch.load(ckpt, weights_only=False)
    model = il.model.MaskPredictor(il.model.ModelConfig(**raw["illada"]["model_config"]))
    add_adapters(model, LoraConfig(**raw["illada"]["lora"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in raw["state_dict"].items()})
    return model, raw


def config(root: Path, llada, *extra: str) -> ExperimentConfig:
    ckpt, conf, instruct, corpus = llada
    args = run_args(root, conf, instruct, corpus, f"init_from={ckpt}", *SFT, *LORA, *EVAL,
                    f"eval.data.cloze={corpus}", *extra)
    return load_config(ExperimentConfig, DEFAULT_YAML, args)


@pytest.fixture(scope="module")
def lora_run(llada_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_experiment(config(root, llada_dir, "name=lora", "mlflow.enabled=true",
                                   f"mlflow.tracking_uri={uri}"), preview=False)
    return root, result, uri


def test_lora_sft_from_a_released_directory_trains_only_adapters_and_logs_counts(lora_run, llada_dir):  # noqa: F811
    root, result, uri = lora_run
    ckpt_dir, conf, _, _ = llada_dir
    summary = result["stages"]["sft"]
    assert summary["global_step"] == 8 and summary["last_loss_avg"] < summary["first_loss_avg"], summary
    client = MlflowClient(uri)
    sft = client.get_run(result["mlflow_runs"]["sft"])
    released, _ = il.load_checkpoint(ckpt_dir)
    counts = adapted_parameter_counts(released.config, LoraConfig(rank=4, alpha=8))
    assert sft.data.params["lora.trainable_params"] == str(counts["trainable_params"])
    assert sft.data.params["lora.total_params"] == str(counts["total_params"])
    assert sft.data.params["sft.lora.rank"] == "4"
    share = counts["trainable_params"] / counts["total_params"]
    assert 0 < share < 0.1, share
    history = client.get_metric_history(sft.info.run_id, "eval/cloze/acc")
    assert sorted(m.step for m in history) == [1, 2]  # the per-epoch evaluation ran on the adapted model
    # Only the adapters moved: every base weight is still the released one, bit for bit.
    model, raw = adapted_from(root / "lora" / "sft" / "checkpoints" / "last.ckpt")
    assert raw["illada"]["lora"]["rank"] == 4
    base = released.state_dict()
    for name, p in model.state_dict().items():
        if is_adapter_param(name):
            continue
        assert torch.equal(p, base[name.replace(".base_layer.", ".")]), name
    assert all(p.abs().max() > 0 for n, p in model.state_dict().items() if "lora_B" in n)


def test_the_runs_model_pt_and_both_exports_hold_the_merged_weights(lora_run, tmp_path):
    root, _, _ = lora_run
    model, _ = adapted_from(root / "lora" / "sft" / "checkpoints" / "last.ckpt")
    adapted = logits(model)
    run_export = torch.load(root / "lora" / "sft" / "model.pt", weights_only=False)
    assert run_export["lora_merged"]["rank"] == 4 and not any(is_adapter_param(k) for k in run_export["state_dict"])
    merged, tokenizer = il.load_checkpoint(root / "lora")  # what evaluate / generate read
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    assert tokenizer is not None and tokenizer.mask_id == merged.config.mask_token_id
    for fmt, source in (("hf", root / "lora" / "sft" / "checkpoints" / "last.ckpt"), ("pt", root / "lora")):
        assert export_main([f"ckpt={source}", f"format={fmt}", f"out={tmp_path / fmt}", "dtype=float32"]) == 0
        exported, _ = il.load_checkpoint(tmp_path / fmt)
        torch.testing.assert_close(logits(exported), adapted, rtol=1e-5, atol=1e-5)


def test_a_crashed_lora_run_resumes_onto_the_uninterrupted_weights(lora_run, llada_dir, tmp_path):  # noqa: F811
    root, _, _ = lora_run
    with pytest.raises(SimulatedCrash):
        run_experiment(config(tmp_path, llada_dir, "name=cut"), extra_callbacks=[StopAt(3)], preview=False)
    assert (tmp_path / "cut" / "sft" / "checkpoints" / "step=0000002.ckpt").exists()
    # resuming with other adapters is refused, naming both settings
    with pytest.raises(ValueError, match=r"trained with sft\.lora=\{'rank': 4.*this run asks for sft\.lora=\{'rank': 2"):
        run_experiment(config(tmp_path, llada_dir, "name=cut", "resume=auto", "sft.lora.rank=2"), preview=False)
    resumed = run_experiment(config(tmp_path, llada_dir, "name=cut", "resume=auto"), preview=False)
    assert resumed["stages"]["sft"]["global_step"] == 8
    full = torch.load(root / "lora" / "sft" / "model.pt", weights_only=False)["state_dict"]
    cut = torch.load(tmp_path / "cut" / "sft" / "model.pt", weights_only=False)["state_dict"]
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-5, atol=1e-6)


def test_bad_targets_are_refused_before_anything_is_trained(llada_dir, tmp_path):  # noqa: F811
    cfg = config(tmp_path, llada_dir, "name=bad", "sft.lora.targets=[attn.qkv,q_proj]")
    with pytest.raises(LoraError, match=r"'q_proj' matches no module"):
        run_experiment(cfg, preview=False)
    assert not (tmp_path / "bad" / "sft").exists()


# ----------------------------------------------------------------------------- FSDP2, two gloo processes


def test_fsdp_shards_the_adapters_with_their_blocks_and_trains_like_one_process(llada_dir, tmp_path):  # noqa: F811
    ckpt, conf, instruct, corpus = llada_dir
    common = run_args(tmp_path, conf, instruct, corpus, f"init_from={ckpt}", *SFT, *LORA, *EVAL,
                      f"eval.data.cloze={corpus}", "accelerator=cpu", "sft.batch_size=4", "sft.epochs=1")
    command = [sys.executable, "-m", "tests.fsdp_worker", str(tmp_path / "out2"), *common, "name=fsdp",
               "strategy=fsdp", "devices=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from tests.fsdp_worker import main as worker_main

    worker_main([str(tmp_path / "out1"), *common, "name=single", "strategy=auto", "devices=1",
                 "sft.accumulate_grad_batches=2"])
    fsdp = [json.loads((tmp_path / "out2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "out1" / "rank0.json").read_text())
    assert "error" not in fsdp[0] and "error" not in single, (fsdp[0].get("error"), single.get("error"))
    a, s = fsdp[0]["record"]["sft"], single["record"]["sft"]
    per_step = [(s["losses"][i][1] + s["losses"][i + 1][1]) / 2 for i in range(0, len(s["losses"]), 2)]
    assert [v for _, v in a["losses"]] == pytest.approx(per_step, abs=1e-5)
    assert [v for _, v in a["grad_norms"]] == pytest.approx([v for _, v in s["grad_norms"]], rel=1e-4)
    assert a["eval"] == s["eval"] and len(a["eval"]) == 1  # gathered + merged on rank 0 = the live adapted model
    # The sharded checkpoint splits every adapter over both ranks, as the blocks' own weights.
    from torch.distributed.checkpoint import FileSystemReader

    step_dir = max((tmp_path / "fsdp" / "sft" / "checkpoints").glob("step=*.ckpt"))
    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    adapters = {k: v for k, v in meta.items() if ".lora_" in k and not k.endswith(".step")}  # weights, AdamW moments
    assert len([k for k in adapters if k.startswith("state_dict.")]) == 16 and len(adapters) == 48, sorted(adapters)
    assert all(len(v.chunks) == 2 for v in adapters.values())
    # The merged export of the sharded run gives the logits of the sharded adapted model, and the single run's.
    merged, _ = il.load_checkpoint(tmp_path / "fsdp" / "sft" / "model.pt")
    with torch.no_grad():
        from tests.fsdp_worker import probe_ids

        out = merged.eval()(probe_ids(merged.config.vocab_size))
    torch.testing.assert_close(out, torch.load(tmp_path / "out2" / "logits.pt"), rtol=1e-5, atol=1e-5)
    from_shards, _ = il.load_checkpoint(step_dir)  # the last sharded checkpoint, read and merged on one process
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(from_shards.state_dict()[k], v, rtol=0, atol=1e-6)
    single_w = torch.load(tmp_path / "single" / "sft" / "model.pt", weights_only=False)["state_dict"]
    fsdp_w = torch.load(tmp_path / "fsdp" / "sft" / "model.pt", weights_only=False)["state_dict"]
    for k in single_w:
        torch.testing.assert_close(fsdp_w[k], single_w[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- a multirun over the rank


def test_multirun_over_the_lora_rank(llada_dir, tmp_path):  # noqa: F811
    ckpt, conf, instruct, corpus = llada_dir
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = run_args(tmp_path, conf, instruct, corpus, f"init_from={ckpt}", *SFT, "sft.epochs=1")
    assert run_main([str(DEFAULT_YAML), "--multirun", *[a for a in args if not a.startswith("mlflow.enabled")],
                     "sft.lora.rank=0,4", "sweep.objective.metric=val/loss", "sweep.objective.direction=minimize",
                     f"sweep.output_dir={tmp_path / 'mr'}", f"sweep.tracking_uri={uri}"]) == 0
    storage = open_storage(f"sqlite:///{tmp_path / 'mr' / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(uri)
    for trial in study.trials:
        rank = trial.params["sft.lora.rank"]
        runs = json.loads((tmp_path / "mr" / f"trial_{trial.number:04d}" / "mlflow_runs.json").read_text())
        params = client.get_run(runs["sft"]).data.params
        assert params["sft.lora.rank"] == str(rank)
        assert ("lora.trainable_params" in params) == (rank > 0)  # full SFT logs no adapter counts
        assert trial.value == pytest.approx(client.get_run(runs["parent"]).data.metrics["val/loss"])
