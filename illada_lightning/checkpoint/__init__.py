"""Checkpoints: the one place that reads and writes them, below training and evaluation.

    files.py   crash-safe files: atomic writes, step checkpoints, "is this checkpoint complete?", the resume scan
    model.py   models in and out: run directories, Lightning / sharded (FSDP2 DCP) checkpoints, `model.pt` exports,
               released Hugging Face directories (through `interop/`), `load_checkpoint`
"""

from .files import (
    CheckpointError,
    atomic_write,
    checkpoint_problem,
    find_resume_checkpoint,
    link_last,
    nonfinite_tensors,
    prune_step_checkpoints,
    remove_partial_writes,
    step_checkpoints,
    step_of,
)
from .model import (
    EXPORT_FILE,
    FINISHED_FILE,
    STAGE_ORDER,
    TOKENIZER_DIR,
    check_compatible,
    checkpoint_tokenizer,
    export_model,
    full_model_state,
    last_checkpoint,
    load_checkpoint,
    load_init_weights,
    read_finished,
    read_model_checkpoint,
    read_model_layout,
    resolve_checkpoint,
    write_finished,
)

__all__ = [
    "EXPORT_FILE", "FINISHED_FILE", "STAGE_ORDER", "TOKENIZER_DIR", "CheckpointError", "atomic_write",
    "check_compatible", "checkpoint_problem", "checkpoint_tokenizer", "export_model", "find_resume_checkpoint", "full_model_state",
    "last_checkpoint", "link_last", "load_checkpoint", "load_init_weights", "nonfinite_tensors",
    "prune_step_checkpoints", "read_finished", "read_model_checkpoint", "read_model_layout", "remove_partial_writes",
    "resolve_checkpoint", "step_checkpoints", "step_of", "write_finished",
]
