"""Keyword options checked against a dataclass's fields, with one error message for every entry point."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields


def reject_unknown(cls: type, names: Iterable[str], what: str, noun: str = "option") -> None:
    """TypeError naming every name that is not a field of `cls` (and listing the valid ones)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise TypeError(f"unknown {what} {noun}(s) {unknown}; valid {noun}s: {sorted(known)}")
