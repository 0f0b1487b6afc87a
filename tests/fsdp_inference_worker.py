"""Run in a subprocess by tests/test_fsdp_inference.py: FSDP2 meets inference mode, on one gloo CPU process.

`sampler` : generate (inference_context) through a sharded model first, then a training step (the order of
            a preview or per-epoch evaluation before more training), with bf16 parameters or fp32 ones.
`trainer` : `run_training` with strategy=fsdp devices=1, with Lightning's gloo exemption switched off, so its
            evaluation loops choose the context exactly as they do under NCCL on GPUs (where the first
            validation crashed with "Inference tensors do not track version counter").
Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import sys


def sampler_then_train(param_dtype: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import illada_lightning as il
    from illada_lightning.training.strategy import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29561"), RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = il.build_model("tiny", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=512)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[param_dtype]
    shard_model(model, init_device_mesh("cpu", (1,)), param_dtype=dtype)
    prompt = torch.randint(4, 512, (6,))
    out = il.generate(model, [prompt], steps=4, gen_length=4, block_length=4, precision="fp32")
    loss = model(torch.randint(4, 512, (2, 16))).float().logsumexp(-1).mean()
    loss.backward()
    return {"generated": len(out[0]), "grad": all(p.grad is not None for p in model.parameters())}


def trainer_validation(root: str) -> dict:
    import lightning.pytorch.loops.utilities as loop_utilities

    from illada_lightning.config import load_config
    from illada_lightning.training.config import TrainingConfig
    from illada_lightning.training.experiment import run_training

    loop_utilities._distributed_is_initialized = lambda: False  # as under NCCL: no gloo exemption
    cfg = load_config(TrainingConfig, None, [
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
        "model.vocab_size=512", "model.max_seq_len=64", "tokenizer.vocab_size=512", "progress_bar=false",
        "pretrain.data.max_seq_len=null", "mlflow.enabled=false", "accelerator=cpu", "strategy=fsdp",
        "devices=1", "precision=bf16-mixed", "stage=pretrain", "pretrain.max_steps=3", "pretrain.batch_size=2",
        "pretrain.val_every_n_steps=2", "pretrain.limit_val_batches=1", f"runs_root={root}", "name=fsdp1",
        f"pretrain.data.cache_dir={root}/cache",
    ])
    summary = run_training(cfg, preview=False)["stages"]["pretrain"]
    return {"initial_val_loss": summary["initial_val_loss"], "val_loss": summary["val_loss"],
            "global_step": summary["global_step"]}


def main(argv: list[str]) -> int:
    what = argv[0]
    try:
        result = sampler_then_train(argv[1]) if what == "sampler" else trainer_validation(argv[1])
    except Exception as exc:  # reported to the test, which names the failure
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
