"""Per-example outputs as JSONL (prompt, candidates, scores, prediction, target, correct), one file per task.

The file is appended to after every batch and flushed, so an evaluation interrupted mid-way resumes: the
examples already in the file are skipped and their records count towards the metrics. A sidecar
`<task>.examples.meta.json` holds the settings that change the outputs (scoring rule, few-shot, seed, ...);
resuming with different settings is refused rather than mixing two evaluations in one number. A last line cut
short by the interruption is dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class ExampleOutputs:
    """Records by doc_id, mirrored to a JSONL file when `path` is given (else kept in memory only)."""

    def __init__(self, path: str | Path | None, settings: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.settings = settings or {}
        self.records: dict[str, dict] = {}
        if self.path is None:
            return
        self.meta_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".meta.json")
        if self.path.exists():
            self._check_settings()
            self.records = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta_path.write_text(json.dumps(settings, indent=1, sort_keys=True))

    def _check_settings(self) -> None:
        if not self.meta_path.exists():
            raise ValueError(f"{self.path} exists without {self.meta_path.name}; cannot tell how it was made. "
                             f"Move it away or choose another out= directory")
        previous = json.loads(self.meta_path.read_text())
        if previous != self.settings:
            changed = sorted(k for k in {*previous, *self.settings} if previous.get(k) != self.settings.get(k))
            raise ValueError(
                f"cannot resume from {self.path}: it was written with different settings ({', '.join(changed)}: "
                f"{[previous.get(k) for k in changed]} then, {[self.settings.get(k) for k in changed]} now). "
                f"Delete it or choose another out= directory"
            )

    def _read(self) -> dict[str, dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records, good = {}, []
        for i, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):  # the write the interruption cut short
                    log.warning("%s:%d: dropping a partial last line from an interrupted run", self.path, i)
                    self.path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
                    break
                raise ValueError(f"{self.path}:{i}: not valid JSON; the per-example file is corrupt") from None
            records[str(record["doc_id"])] = record
            good.append(line)
        if records:
            log.info("resuming: %d examples already in %s", len(records), self.path)
        return records

    def done(self, doc_id: str) -> bool:
        return doc_id in self.records

    def records_for(self, doc_ids) -> list[dict]:
        return [self.records[d] for d in doc_ids]

    def append(self, new_records: list[dict]) -> None:
        if self.path is None:
            self.records.update((str(r["doc_id"]), r) for r in new_records)
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for record in new_records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[str(record["doc_id"])] = record
            f.flush()
