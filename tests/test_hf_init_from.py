"""Training from a released LLaDA checkpoint with its own tokenizer: `init_from=<HF dir>` for SFT and for
continued pretraining. The directory is a tiny random LLaDA-layout checkpoint whose special tokens sit at the
end of the vocabulary (EOS, mask not at 0..8) with a Llama-3-style Jinja chat template, as the released one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import illada_lightning as il
from experiments.export import main as export_main
from experiments.generate import main as generate_main
from experiments.run import main as run_main
from illada_lightning.checkpoint import CheckpointError
from illada_lightning.config import load_config
from illada_lightning.data.checkpoint_tokenizer import CheckpointTokenizer, load_tokenizer, tokenizer_from_str
from illada_lightning.data.config import SFTDataConfig
from illada_lightning.data.datamodule import SFTDataModule
from illada_lightning.data.sft import example_stream_documents, load_sft_examples, response_only_rows
from illada_lightning.evaluation.cli import main as evaluate_main
from illada_lightning.experiment.config import ExperimentConfig
from illada_lightning.experiment.run import run_experiment
from tests.test_eval_tasks import ARC_LETTERS, ARC_NUMERIC, write_jsonl
from tests.test_hf_checkpoint import write_llada_like
from tests.test_run_experiment import DEFAULT_YAML

CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """(directory, its config.json, instruct jsonl, corpus text) in a module-scoped folder."""
    root = tmp_path_factory.mktemp("llada")
    _, conf = write_llada_like(root / "ckpt")
    assert conf["eos_token_id"] > 8 and conf["mask_token_id"] > 8  # not this project's fixed ids
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b} = {a + b}"}
            for a, b in rng.integers(0, 10, size=(48, 2))]
    (root / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = "".join(f"Janet sells {n} ducks at the market. The Sun heats water.\n\n" for n in range(60))
    (root / "corpus.txt").write_text(corpus)
    return root / "ckpt", conf, root / "instruct.jsonl", root / "corpus.txt"


def model_overrides(conf: dict) -> list[str]:
    """The `model.*` keys matching the directory's config.json (what the init_from error asks for)."""
    return [f"model.n_layers={conf['n_layers']}", f"model.d_model={conf['d_model']}",
            f"model.n_heads={conf['n_heads']}", f"model.n_kv_heads={conf['n_kv_heads']}",
            f"model.ffn_dim={conf['mlp_hidden_size']}", f"model.vocab_size={conf['embedding_size']}",
            f"model.max_seq_len={conf['max_sequence_length']}", "model.tie_embeddings=false",
            f"model.rope_theta={conf['rope_theta']}", f"model.norm_eps={conf['rms_norm_eps']}",
            f"model.mask_token_id={conf['mask_token_id']}", f"model.eos_token_id={conf['eos_token_id']}",
            f"model.pad_token_id={conf['pad_token_id']}"]


def run_args(root, conf, instruct, corpus, *extra) -> list[str]:
    return [f"runs_root={root}", "mlflow.enabled=false", "progress_bar=false", *model_overrides(conf),
            f"sft.data.train_files=[{instruct}]", f"sft.data.val_files=[{instruct}]", "sft.data.max_seq_len=null",
            "sft.data.masking=whole_window",
            f"pretrain.data.train_files=[{corpus}]", f"pretrain.data.val_files=[{corpus}]",
            "pretrain.data.max_seq_len=null", f"pretrain.data.cache_dir={root / 'cache'}",
            f"sft.data.cache_dir={root / 'cache'}", "sft.batch_size=8", "pretrain.batch_size=8",
            "sft.limit_val_batches=2", "pretrain.limit_val_batches=2", "sft.log_every_n_steps=2",
            "pretrain.log_every_n_steps=2", "preview.num_prompts=1", "preview.sampler.gen_length=4", "preview.sampler.steps=4",
            "preview.sampler.block_length=4", *extra]


# ----------------------------------------------------------------------------- data layer (fast)


def test_sft_examples_use_the_checkpoints_template_and_eos(llada_dir):
    ckpt, conf, instruct, _ = llada_dir
    _, tokenizer = il.load_checkpoint(ckpt)
    assert isinstance(tokenizer, CheckpointTokenizer)
    eos = conf["eos_token_id"]
    examples = load_sft_examples([instruct], tokenizer, multi_turn_split=False, cache_dir=None)
    assert tokenizer.decode(examples.prompts[0], skip_special_tokens=False).startswith("<|startoftext|><|start_header")
    # whole_window (iLLaDA §2.2): each document is prompt + response + the checkpoint's EOS, exactly once
    for doc in example_stream_documents(examples, tokenizer.eos_id):
        assert doc[-1] == eos and int((doc == eos).sum()) == 1
        assert doc[0] == tokenizer.bos_id and tokenizer.token_to_id("<|eot_id|>") in doc
    # response_only (LLaDA baseline): the same ending, the prompt kept apart
    rows, prompt_lens = response_only_rows(examples, 64, tokenizer.eos_id)
    assert all(r[-1] == eos for r in rows) and all(r[n - 1] != eos for r, n in zip(rows, prompt_lens))
    # The batches the SFT stage trains on hold the checkpoint's EOS, never our fixed id 2 as an EOS.
    dm = SFTDataModule(SFTDataConfig(train_files=[str(instruct)], val_files=[], cache_dir=None), tokenizer, 64, 4, 0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert int((batch["input_ids"] == eos).sum()) >= 2


def test_checkpoint_tokenizer_saves_and_embeds_its_ids_and_template(llada_dir, tmp_path):
    ckpt, conf, _, _ = llada_dir
    _, tokenizer = il.load_checkpoint(ckpt)
    ids = (tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id)
    chat = [{"role": "user", "content": "What is 2+3?"}]
    assert tokenizer.format_chat(chat, True) == CHAT
    tokenizer.save(tmp_path / "tok")
    for back in (load_tokenizer(tmp_path / "tok"), tokenizer_from_str(tokenizer.to_str())):
        assert isinstance(back, CheckpointTokenizer)
        assert (back.mask_id, back.eos_id, back.pad_id, back.bos_id) == ids
        assert back.format_chat(chat, True) == CHAT and back.fingerprint() == tokenizer.fingerprint()
    # The template is part of the fingerprint: SFT caches keyed by it never mix two formats.
    other = CheckpointTokenizer(tokenizer.backend, mask_id=ids[0], eos_id=ids[1], pad_id=ids[2], bos_id=ids[3],
                                chat_template="{{ messages[0]['content'] }}")
    assert other.fingerprint() != tokenizer.fingerprint()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token is missing"):
        load_tokenizer(tmp_path / "tok")


def test_init_from_with_a_mismatched_model_names_the_overrides(llada_dir, tmp_path):
    ckpt, conf, instruct, corpus = llada_dir
    args = run_args(tmp_path, conf, instruct, corpus, "stage=sft", f"init_from={ckpt}")
    cfg = load_config(ExperimentConfig, DEFAULT_YAML, [a for a in args if not a.startswith("model.rope_theta")])
    with pytest.raises(CheckpointError, match=r"rope_theta: checkpoint 500000\.0, config 10000\.0.*pass its "
                                              r"architecture: model\.rope_theta=500000\.0$"):
        run_experiment(cfg)
    cfg = load_config(ExperimentConfig, DEFAULT_YAML, [f"runs_root={tmp_path}", "stage=sft", f"init_from={ckpt}",
                                                       "mlflow.enabled=false"])
    with pytest.raises(CheckpointError, match=r"pass its architecture: model\.n_layers=2 model\.d_model=64 .*"
                                              rf"model\.mask_token_id={conf['mask_token_id']}"):
        run_experiment(cfg)
    assert not (tmp_path / "default" / "sft" / "checkpoints").exists()


# ----------------------------------------------------------------------------- end to end (slow)


def _assert_same_tokenizer(tokenizer, reference) -> None:
    assert isinstance(tokenizer, CheckpointTokenizer)
    assert (tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (
        reference.mask_id, reference.eos_id, reference.pad_id, reference.bos_id)
    assert tokenizer.chat_template == reference.chat_template and tokenizer.vocab_size == reference.vocab_size


@pytest.mark.slow
def test_sft_from_a_released_style_checkpoint_trains_and_loads_back(llada_dir, tmp_path, capsys):
    ckpt, conf, instruct, corpus = llada_dir
    _, reference = il.load_checkpoint(ckpt)
    assert run_main(run_args(tmp_path, conf, instruct, corpus, "stage=sft", f"init_from={ckpt}", "name=sft",
                             "sft.max_steps=30", "sft.epochs=50", "sft.optim.lr=3e-3", "sft.optim.warmup_steps=2",
                             "sft.val_every_n_steps=0")) == 0
    run = tmp_path / "sft"
    finished = json.loads((run / "sft" / "FINISHED").read_text())
    assert finished["global_step"] == 30 and np.isfinite(finished["last_loss"])
    assert finished["last_loss_avg"] < finished["first_loss_avg"], finished
    assert finished["val_loss"] < finished["initial_val_loss"], finished  # the same fixed masks before and after
    # The run saved the checkpoint's tokenizer (ids and template), and every way of loading it gives it back.
    assert json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())["mask_token"] == "<|mdm_mask|>"
    _assert_same_tokenizer(load_tokenizer(run / "tokenizer"), reference)
    model, tokenizer = il.load_checkpoint(run)
    _assert_same_tokenizer(tokenizer, reference)
    assert model.config.mask_token_id == conf["mask_token_id"]
    _, from_ckpt = il.load_checkpoint(run / "sft" / "checkpoints" / "last.ckpt")
    _assert_same_tokenizer(from_ckpt, reference)
    capsys.readouterr()
    assert generate_main([f"ckpt={run}", "prompt=What is 2+3?", "sampler.steps=4", "sampler.gen_length=4",
                          "sampler.block_length=4"]) == 0
    data = write_jsonl(tmp_path / "arc.jsonl", [ARC_LETTERS, ARC_NUMERIC])
    assert evaluate_main([f"ckpt={run}", "tasks=[arc_challenge]", "scoring.rule=likelihood", "scoring.mc_samples=2",
                          "scoring.mc_batch_size=2", "num_fewshot=0", "mlflow=false", f"out={tmp_path / 'eval'}",
                          f"data.arc_challenge={data}"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["arc_challenge"]["n"] == 2
    # ... and exported back to the released format, it carries the same special tokens and template.
    assert export_main([f"ckpt={run}", "format=hf", f"out={tmp_path / 'hf'}", "dtype=float32"]) == 0
    _, exported = il.load_checkpoint(tmp_path / "hf")
    _assert_same_tokenizer(exported, reference)


@pytest.mark.slow
def test_continued_pretraining_from_a_released_style_checkpoint(llada_dir, tmp_path):
    ckpt, conf, instruct, corpus = llada_dir
    start, reference = il.load_checkpoint(ckpt)
    # A tiny LR: the trained weights must still be the checkpoint's, which shows they were the starting point.
    assert run_main(run_args(tmp_path, conf, instruct, corpus, "stage=pretrain", f"init_from={ckpt}", "name=cpt",
                             "pretrain.max_steps=4", "pretrain.optim.lr=1e-6", "pretrain.optim.min_lr=1e-7",
                             "pretrain.optim.warmup_steps=1", "pretrain.val_every_n_steps=0")) == 0
    finished = json.loads((tmp_path / "cpt" / "pretrain" / "FINISHED").read_text())
    assert finished["global_step"] == 4 and np.isfinite(finished["last_loss"])
    model, tokenizer = il.load_checkpoint(tmp_path / "cpt")
    _assert_same_tokenizer(tokenizer, reference)
    for name, p in start.state_dict().items():
        assert torch.allclose(model.state_dict()[name], p, atol=1e-4), name
