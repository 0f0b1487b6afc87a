"""`python -m experiments.export ckpt=RUN format=hf out=DIR`, and the checkpoint CLIs reading the directory it
writes (`experiments.evaluate ckpt=DIR`, `experiments.generate ckpt=DIR`) with the original's results."""

import json
import subprocess
import sys

import pytest
import torch

from experiments.export import main as export_main
from experiments.generate import main as generate_main
from illada_lightning import build_model
from illada_lightning.checkpoint import export_model
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.evaluation.cli import main as evaluate_main
from tests.test_eval_tasks import ARC_LETTERS, ARC_NUMERIC, GSM8K_TEST, write_jsonl

pytestmark = pytest.mark.slow  # end to end through the CLIs

TEXT = "What is the main source of energy for Earth? The Sun heats water. Janet sells ducks. " * 20


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tokenizer = train_tokenizer_from_iterator([TEXT], 320)
    model = build_model("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=384,
                        max_seq_len=256)
    ckpt = export_model(root / "run" / "sft" / "model.pt", model.config, model.state_dict(),
                        tokenizer.backend.to_str())
    assert export_main([f"ckpt={root / 'run'}", "format=hf", f"out={root / 'hf'}", "dtype=float32"]) == 0
    return ckpt, root / "hf", root


def test_export_writes_the_released_layout(run_and_export, capsys):
    _, out, _ = run_and_export
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json"]
    tok_conf = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_conf["mask_token"] == "<|mask|>" and "add_generation_prompt" in tok_conf["chat_template"]


@pytest.mark.parametrize("rule", ["confidence", "likelihood"])
def test_evaluate_reads_the_exported_directory_with_the_same_results(run_and_export, rule):
    ckpt, out, root = run_and_export
    data = {"arc_challenge": write_jsonl(root / f"arc-{rule}.jsonl", [ARC_LETTERS, ARC_NUMERIC]),
            "gsm8k": write_jsonl(root / f"gsm8k-{rule}" / "test.jsonl", GSM8K_TEST)}
    results, scores = [], []
    for source in (ckpt, out):
        target = root / f"eval-{rule}-{source.name}"
        argv = [f"ckpt={source}", "tasks=[arc_challenge,gsm8k]", f"scoring.rule={rule}", "scoring.mc_samples=4",
                "scoring.mc_batch_size=4", "num_fewshot=0", "sampler.gen_length=8", "sampler.block_length=8",
                "sampler.steps=8", "mlflow=false",
                f"out={target}", *(f"data.{k}={v}" for k, v in data.items())]
        assert evaluate_main(argv) == 0
        results.append(json.loads((target / "results.json").read_text()))
        examples = (target / "arc_challenge.examples.jsonl").read_text().splitlines()
        scores.append([json.loads(line)["scores"] for line in examples])
    strip = [{t: {k: v for k, v in r.items() if k not in ("model", "ckpt", "seconds")} for t, r in res.items()
              if isinstance(r, dict)} for res in results]
    assert strip[0] == strip[1] and "acc" in strip[0]["arc_challenge"]
    assert scores[0] == scores[1] and len(scores[0]) == 2  # per-candidate scores, bit for bit (fp32 export)


def test_generate_reads_the_exported_directory(run_and_export, capsys):
    ckpt, out, _ = run_and_export
    answers = []
    for source in (ckpt, out):
        assert generate_main([f"ckpt={source}", "prompt=What heats water?", "sampler.steps=8",
                              "sampler.gen_length=8", "sampler.block_length=8"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_export_cli_help_and_errors(run_and_export, tmp_path, capsys):
    _, out, _ = run_and_export
    assert export_main(["--help"]) == 0
    assert "format=hf" in capsys.readouterr().out
    assert export_main([f"ckpt={out}", "format=gguf", f"out={tmp_path / 'x'}"]) == 2
    assert "format='gguf' is not one of" in capsys.readouterr().err
    assert export_main([f"ckpt={out}", f"out={out}"]) == 2  # re-export onto itself: refused, nothing lost
    assert "exists and is not empty" in capsys.readouterr().err and (out / "config.json").is_file()
    done = subprocess.run([sys.executable, "-m", "experiments.export", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "ckpt=" in done.stdout


def test_clis_run_a_released_style_directory_with_its_own_special_ids(tmp_path, capsys):
    """A LLaDA-like directory: special tokens at the end of the vocabulary, a Llama-3-style chat template."""
    from tests.test_hf_checkpoint import write_llada_like

    write_llada_like(tmp_path / "ckpt", max_sequence_length=256)
    data = write_jsonl(tmp_path / "arc.jsonl", [ARC_LETTERS, ARC_NUMERIC])
    assert evaluate_main([f"ckpt={tmp_path / 'ckpt'}", "tasks=[arc_challenge]", "scoring.rule=likelihood",
                          "scoring.mc_samples=2", "scoring.mc_batch_size=2", "num_fewshot=0", "mlflow=false",
                          f"out={tmp_path / 'eval'}", f"data.arc_challenge={data}"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["arc_challenge"]["n"] == 2
    # chat template of the directory (Jinja, bos_token from tokenizer_config.json); random weights: any text
    assert generate_main([f"ckpt={tmp_path / 'ckpt'}", "prompt=Who sells ducks?", "sampler.steps=4",
                          "sampler.gen_length=4", "sampler.block_length=4"]) == 0
