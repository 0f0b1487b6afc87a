"""Reading benchmark files with errors that say where: a missing file names the path and what the task expects;
a malformed record names the file and line.

A `Record` is one jsonl object or csv row plus its location; `record["question.stem"]` looks up a (nested)
field and raises `EvalDataError("file:line: ...")` when it is absent, so format adapters stay one-liners.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.corpus import DataFileError, read_jsonl_records


class EvalDataError(ValueError):
    """A benchmark data file that is missing or malformed; the message names the file (and line)."""


def require_file(path: str | Path, task: str, expects: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise EvalDataError(
            f"task '{task}': data file not found: {path}\n  expected: {expects}\n"
            f"  point the task at your copy with data.{task}=PATH"
        )
    return path


@dataclass
class Record:
    data: Any  # dict (jsonl) or list of strings (csv row)
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, message: str) -> EvalDataError:
        return EvalDataError(f"{self.where}: {message}")

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            if not isinstance(self.data, list) or key >= len(self.data):
                n = len(self.data) if isinstance(self.data, list) else 0
                raise self.error(f"row has {n} columns, column {key + 1} is missing")
            return self.data[key]
        value = self.data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.error(f"record has no field '{key}'")
            value = value[part]
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except EvalDataError:
            return default


def read_jsonl(path: Path) -> Iterator[Record]:
    """Records of a jsonl file, through the data pipeline's reader (file:line errors for bad lines)."""
    try:
        records = read_jsonl_records(path)
    except DataFileError as exc:
        raise EvalDataError(str(exc)) from None
    for line_no, data in records:
        yield Record(data, path, line_no)


def read_csv(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if row:
                yield Record(row, path, reader.line_num)


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
