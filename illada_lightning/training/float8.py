"""float8 training of the Transformer blocks' linears with torchao (`float8=true`), as torchtitan ships it.

`torchao.float8.convert_to_float8_training` swaps `nn.Linear` modules for `Float8Linear`: each matmul casts its
inputs to float8 (e4m3 forward, e5m2 for gradients) with dynamic per-tensor scales ("tensorwise" recipe) and
runs on the float8 tensor cores; weights, optimizer state and everything else keep their dtype, and parameter
names do not change (checkpoints stay interchangeable with bf16 runs). As in torchtitan it is applied before
activation checkpointing, torch.compile and FSDP sharding see the model, and compile is what makes it fast
(the scaling and casting fuse into neighbouring kernels). Left in bf16: the embedding and the LM head (the
largest and most precision-sensitive matmul; torchtitan skips `output` too) and any linear whose dimensions are
not multiples of 16 (the float8 GEMM needs them).

Refused, before training, where it cannot run: no torchao, no CUDA device, or a GPU without float8 tensor
cores (compute capability < 8.9: Ada / Hopper and later have them).
"""

from __future__ import annotations

import importlib.util

MIN_CAPABILITY = (8, 9)


class Float8Error(RuntimeError):
    """float8=true on a machine or install that cannot run it."""


def check_float8(accelerator: str = "auto") -> None:
    """Refuse float8 training, with the reason, where torchao or float8 tensor cores are missing."""
    import torch

    if importlib.util.find_spec("torchao") is None:
        raise Float8Error("float8=true needs torchao (pip install 'illada-lightning[float8]'; torchtitan's "
                          "float8 training path), which is not installed")
    if accelerator == "cpu" or not torch.cuda.is_available():
        where = "accelerator=cpu" if accelerator == "cpu" else "no CUDA device is available"
        raise Float8Error(f"float8=true needs a GPU with float8 tensor cores (compute capability >= 8.9, "
                          f"e.g. H100, L40S, RTX 4090), but {where}")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise Float8Error(f"float8=true needs float8 tensor cores (compute capability >= 8.9), but "
                          f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}")


def float8_eligible(module, fqn: str) -> bool:
    """The linears to convert: inside the blocks, both dimensions multiples of 16."""
    import torch

    if not isinstance(module, torch.nn.Linear) or not fqn.startswith("blocks."):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model, accelerator: str = "auto") -> list[str]:
    """Swap the model's eligible linears for torchao's Float8Linear in place (checked first); returns the
    converted names."""
    check_float8(accelerator)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def keep(module, fqn: str) -> bool:
        if float8_eligible(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=keep)
    return converted
