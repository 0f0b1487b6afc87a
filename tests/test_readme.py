"""The README's commands and Python example keep working (the two set-up commands are what CI runs)."""

import re
from pathlib import Path

import torch

from illada_lightning import build_model
from illada_lightning.checkpoint import export_model
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    test_cmd = next(line.split("#")[0].strip() for line in block.splitlines() if "pytest" in line)
    assert test_cmd in CI.read_text()
    assert "python -m experiments.run" in block


def test_readme_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    tok = train_tokenizer_from_iterator(["What is 12 + 30? It is 42. " * 3] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=1, vocab_size=4096)
    ckpt = tmp_path / "model.pt"
    export_model(ckpt, model.config, model.state_dict(), tok.backend.to_str())
    setup = ("import torch; context_ids = torch.tensor([5, 6, 7]); cand_a = torch.tensor([8, 9]); "
             "cand_b = torch.tensor([10])\n")
    namespace: dict = {}
    exec(setup.replace("; ", "\n") + code.replace('"runs/default"', repr(str(ckpt))), namespace)  # noqa: S102
    assert namespace["scores"].shape == (2,)
    assert namespace["logits"].shape[:2] == (2, 64)
