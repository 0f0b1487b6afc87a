"""Which code produced a result: the git commit, logged with every run, benchmark line and report."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str:
    """HEAD of the checkout the package runs from; `GIT_COMMIT` when set (machines that get a copy of the
    working tree without `.git`, such as the GPU machine); 'unknown' otherwise."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
