"""Step checkpoints on disk: atomic writes, the completeness test, the resume scan and keep-K pruning.

Files are written to a temporary name in the same directory, fsynced and renamed (`atomic_write`), so a
checkpoint name never holds a partial file (a full disk leaves the previous checkpoints intact). A sharded
checkpoint is a directory written by torch.distributed.checkpoint and counts as complete only once its
`.metadata` file exists (DCP writes it last). `checkpoint_problem` is the one test of "complete and
loadable" for both kinds; `find_resume_checkpoint` scans `step=N.ckpt` newest-first instead of trusting the
`last.ckpt` link (which Lightning could leave dangling).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STEP_CHECKPOINT = re.compile(r"^step=(\d+)\.ckpt$")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint path that does not exist, holds no model, cannot be written, or does not fit the model."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable) -> Path:
    """Write `path` through `write(binary_file)`: temporary file in the same directory, fsync, rename.

    An OS error (full disk, read-only directory) removes the temporary file and becomes one CheckpointError
    naming `path`; nothing is ever left under the final name but a complete file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        _remove_quietly(tmp)
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise CheckpointError(f"cannot write {path}: {cause.strerror or cause}") from exc
    return path


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The OS error behind `exc`, if any (torch.save's zip writer reports a failed write as a RuntimeError
    raised while handling the OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def step_of(path: Path) -> int | None:
    match = STEP_CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def step_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The `step=N.ckpt` files or sharded directories of a checkpoint folder, newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete, loadable training checkpoint; None when it is.

    A sharded checkpoint (a directory) is complete only once torch.distributed.checkpoint's `.metadata`
    file exists in it (written last); a file must unpickle (memory-mapped: tensors are not read).
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"dangling link to {os.readlink(path)}"
    if path.is_dir():
        return None if (path / ".metadata").is_file() else "sharded checkpoint without .metadata (incomplete)"
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # truncated or foreign: torch's first sentence says which
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"unreadable ({text.split('. ')[0]})"
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        return "holds no training state"
    return None


def nonfinite_tensors(path: str | Path) -> list[str]:
    """Names of the weights holding NaN or inf in a checkpoint file (sharded directories: not read, [])."""
    path = Path(path)
    if path.is_dir():
        return []
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def find_resume_checkpoint(stage_dir: str | Path, *, finite: bool = False) -> Path | None:
    """The newest step checkpoint of a stage that loads (and, with `finite`, holds only finite weights).

    Each one skipped is named in a warning. None when the stage has no step checkpoint; a CheckpointError
    when it has some but none is usable, since starting from scratch there would silently discard them.
    """
    ckpt_dir = Path(stage_dir) / "checkpoints"
    candidates = step_checkpoints(ckpt_dir)
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None and finite:
            bad = nonfinite_tensors(path)
            problem = f"{len(bad)} weight tensor(s) hold NaN/inf ({', '.join(bad[:3])})" if bad else None
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
        problems.append(f"{path.name}: {problem}")
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoint(s) in {ckpt_dir} can be resumed from ({'; '.join(problems)}); "
            "refusing to start from scratch beside them: move them away or choose a new name=... or run_dir=...")
    return None


def remove_partial_writes(ckpt_dir: str | Path) -> list[Path]:
    """Delete temporary files left by writes that a crash interrupted (one training process per run dir)."""
    ckpt_dir = Path(ckpt_dir)
    partial = [p for p in ckpt_dir.glob(".*.tmp-*") if p.is_file()] if ckpt_dir.is_dir() else []
    for p in partial:
        log.warning("removing %s, a checkpoint write interrupted by a crash", p)
        _remove_quietly(p)
    return partial


def link_last(ckpt_dir: str | Path, target: Path) -> None:
    """Point `last.ckpt` at `target` (replaced atomically: the link is never missing or dangling)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / f".last.ckpt.tmp-{os.getpid()}"
    _remove_quietly(tmp)
    os.symlink(target.name, tmp)
    os.replace(tmp, ckpt_dir / "last.ckpt")


def prune_step_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete step checkpoints older than the `keep` newest complete ones; returns what was deleted."""
    complete = [p for p in step_checkpoints(ckpt_dir) if checkpoint_problem(p) is None]
    if len(complete) <= keep:
        return []
    oldest_kept = step_of(complete[keep - 1])
    doomed = [p for p in step_checkpoints(ckpt_dir) if step_of(p) < oldest_kept]
    for p in doomed:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return doomed


