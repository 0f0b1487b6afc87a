"""Both directions against the released modelling code itself, when it is available (skipped otherwise).

Set LLADA_MODELING_DIR to a directory holding the released `modeling_llada.py` and `configuration_llada.py`
(from a LLaDA checkpoint or a public fork; not shipped here) with `transformers` importable:
- our export (GQA + tied, and MHA + untied) loads into `LLaDAModelLM` strictly and gives our logits;
- a randomly initialised `LLaDAModelLM`, saved under its own names with its own config, loads here with its logits.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import illada_lightning as il
from illada_lightning import build_model
from illada_lightning.interop.llada_hf import export_hf_checkpoint

MODELING_DIR = os.environ.get("LLADA_MODELING_DIR")
pytestmark = pytest.mark.skipif(not MODELING_DIR, reason="LLADA_MODELING_DIR (released modelling code) not set")


@pytest.fixture(scope="module")
def released():
    pytest.importorskip("transformers")
    directory = Path(MODELING_DIR).resolve()
    sys.path.insert(0, str(directory.parent))
    try:
        modeling = importlib.import_module(f"{directory.name}.modeling_llada")
        configuration = importlib.import_module(f"{directory.name}.configuration_llada")
    finally:
        sys.path.remove(str(directory.parent))
    return modeling.LLaDAModelLM, configuration.LLaDAConfig


def released_model(directory: Path, released):
    LLaDAModelLM, LLaDAConfig = released
    config = LLaDAConfig(**json.loads((directory / "config.json").read_text()))
    model = LLaDAModelLM(config, init_params=False)
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    model.load_state_dict(state, strict=True)  # every released name present, nothing extra
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_our_export_loads_in_the_released_code_with_our_logits(tmp_path, released, tied):
    torch.manual_seed(0)
    ours = build_model("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2 if tied else 4, ffn_dim=96,
                       vocab_size=384, max_seq_len=64, tie_embeddings=tied).eval()
    export_hf_checkpoint(ours, None, tmp_path / "hf", dtype="float32", max_shard_bytes=50_000)
    theirs = released_model(tmp_path / "hf", released)
    ids = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() < 1e-5


def test_released_random_model_loads_here_with_its_logits(tmp_path, released):
    LLaDAModelLM, LLaDAConfig = released
    from tests.test_hf_checkpoint import published_config

    conf = published_config(n_kv_heads=2, init_fn="normal", init_std=0.1)
    torch.manual_seed(1)
    theirs = LLaDAModelLM(LLaDAConfig(**conf), init_params=True).eval()
    with torch.no_grad():  # their init leaves norms at 1: perturb them so misplaced norms would show
        for name, p in theirs.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(conf))
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    ours, _ = il.load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() < 1e-5
