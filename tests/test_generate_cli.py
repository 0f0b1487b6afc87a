"""`python -m experiments.generate`: single prompt and multi-turn chat from an exported checkpoint."""

import subprocess
import sys

import pytest
import torch

from experiments.generate import GenerateConfig, chat_loop, complete, main
from illada_lightning import build_model
from illada_lightning.checkpoint import export_model, load_checkpoint
from illada_lightning.config import ConfigError, load_config
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_tokenizer_from_iterator(["what is one plus two? three. hello there friend."] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64,
                        vocab_size=320, max_seq_len=256)
    path = tmp_path_factory.mktemp("gen") / "model.pt"
    export_model(path, model.config, model.state_dict(), tok.backend.to_str() if hasattr(tok, "backend") else None)
    return path


def cfg_for(ckpt, *extra):
    return load_config(GenerateConfig, None, [f"ckpt={ckpt}", "sampler.steps=8", "sampler.gen_length=8",
                                              "sampler.block_length=8", "sampler.max_new_tokens=16", *extra])


def test_single_prompt_is_deterministic_and_bounded(ckpt):
    cfg = cfg_for(ckpt, "prompt=hello")
    model, tok = load_checkpoint(ckpt)
    a, b = complete(model, tok, "hello", cfg), complete(model, tok, "hello", cfg)
    assert a == b
    assert len(tok.encode(a)) <= 16 + 2  # decode/encode round trip may merge or split a token


def test_chat_keeps_history(ckpt):
    cfg = cfg_for(ckpt, "chat=true")
    model, tok = load_checkpoint(ckpt)
    inputs = iter(["hello", "what is one plus two?", ""])
    said = []
    messages = chat_loop(model, tok, cfg, read=lambda _: next(inputs), write=said.append)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert len(said) == 2 and messages[2]["content"] == "what is one plus two?"


def test_cli_runs_and_bad_input_is_clear(ckpt):
    assert main([f"ckpt={ckpt}", "prompt=hello", "sampler.steps=4", "sampler.gen_length=4",
                 "sampler.block_length=4", "sampler.max_new_tokens=4"]) == 0
    with pytest.raises(ConfigError, match="prompt"):
        load_config(GenerateConfig, None, [f"ckpt={ckpt}"])
    out = subprocess.run([sys.executable, "-m", "experiments.generate", "ckpt=/nonexistent/x.pt", "prompt=hi"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "nonexistent" in out.stderr and "Traceback" not in out.stderr


def test_variable_length_budget_is_shortened_to_the_model_context(ckpt, capsys):
    from experiments.generate import sampler_options

    model, _ = load_checkpoint(ckpt)
    cfg = load_config(GenerateConfig, None, [f"ckpt={ckpt}", "prompt=x", "sampler.max_new_tokens=300",
                                             "sampler.steps=300"])
    opts = sampler_options(model, n_prompt=56, cfg=cfg)
    assert opts["max_new_tokens"] == 200 and opts["steps"] == 200  # 256 - 56, steps scaled alike (50 blocks of 4)
    assert "max_new_tokens 300 -> 200" in capsys.readouterr().err
    fixed = load_config(GenerateConfig, None, [f"ckpt={ckpt}", "prompt=x", "sampler.variable_length=false"])
    assert sampler_options(model, n_prompt=10, cfg=fixed)["gen_length"] == 128  # a length that fits is kept
    opts = sampler_options(model, n_prompt=190, cfg=fixed)  # 66 tokens of room: whole blocks of 4, steps alike
    assert (opts["gen_length"], opts["steps"], opts["block_length"]) == (64, 64, 4)
    assert "gen_length 128 -> 64" in capsys.readouterr().err


def test_default_budget_is_the_trained_window_less_the_prompt(ckpt, tmp_path, capsys):
    """A checkpoint trained on 128-token windows (the default job's SFT) answers within them: the default
    budget of 128 new tokens after a 21-token prompt ran to position 149, where the model has never been."""
    import shutil

    from experiments.generate import sampler_options
    from illada_lightning.budget import trained_context

    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    shutil.copy(ckpt, run / "sft" / "model.pt")
    (run / "config.yaml").write_text("pretrain:\n  data:\n    max_seq_len: 128\nsft:\n  data:\n    max_seq_len: 128\n")
    model, tok = load_checkpoint(run / "sft")
    context = trained_context(run / "sft", model.config.max_seq_len)
    cfg = load_config(GenerateConfig, None, [f"ckpt={run / 'sft'}", "prompt=hello"])
    opts = sampler_options(model, 21, cfg, context)
    assert context == 128 and opts["max_new_tokens"] == 107 and opts["steps"] == 108  # 27 blocks of <= 4
    assert "trained on 128-token sequences" in capsys.readouterr().err
    assert main([f"ckpt={run / 'sft'}", "prompt=hello"]) == 0  # runs with those defaults
