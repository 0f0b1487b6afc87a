"""A tokenized corpus on disk: flat token shards, document offsets and a manifest; prepared once, read by window.

Storage, per shard: `shard-NNNNN.tokens` (the shard's token ids back to back, every document followed by EOS;
uint16 when the vocabulary fits, else uint32; little-endian) and `shard-NNNNN.docs` (int64 offsets where its
documents start). This is the nanoGPT / Megatron layout: no new dependency, a training window is one contiguous
read at a computed offset, and a reader holds nothing but the window it asked for. Reads use `os.pread`, not
`np.memmap`: mapped pages once read count in the reader's resident memory until the kernel reclaims them, so
a pass over a big corpus would look as if it grew. The Arrow files `datasets` writes keep one list of ids per
document (their offsets would have to be flattened per read); LitData would add a dependency that brings its
own torch.

`manifest.json` is written last, after every shard, and the corpus directory is published by one rename, so a
directory without a manifest is an unfinished or foreign one (an error says so). It holds the tokenizer
fingerprint, documents, tokens, shards and the sources' SHA-256; preparing again from the same sources with
the same tokenizer and options finds it and does nothing.

Resident memory of a reader (`DiskShard`): the window being read plus one `.docs` block of `INDEX_STRIDE`
offsets, and a coarse in-memory index of every `INDEX_STRIDE`-th document start (8 bytes per 1024 documents).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from illada_lightning.data.corpus import DataFileError, check_data_file, file_hash
from illada_lightning.data.stream import TokenStream

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INDEX_STRIDE = 1024
DEFAULT_SHARD_TOKENS = 1 << 28  # ~268M tokens, 512 MB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise DataFileError(f"{path} not found: {corpus_dir} is not a prepared corpus (or its preparation did "
                            f"not finish); prepare it with `python -m experiments.prepare_data`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}: malformed manifest ({exc.msg})") from None


# --- reading -------------------------------------------------------------------------------------------


class DiskShard:
    """One shard of a prepared corpus, read with `os.pread` (see the module doc); picklable (files reopen)."""

    def __init__(self, tokens_path: Path, docs_path: Path, n_tokens: int, n_docs: int, dtype: str):
        self.tokens_path, self.docs_path = Path(tokens_path), Path(docs_path)
        self.n_tokens, self.n_docs, self.dtype = int(n_tokens), int(n_docs), np.dtype(dtype)
        for path, expected in ((self.tokens_path, self.n_tokens * self.dtype.itemsize), (self.docs_path, self.n_docs * 8)):
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                found = "missing" if size is None else f"{size} bytes"
                raise DataFileError(f"{path}: truncated or damaged shard ({found}, the manifest says {expected} "
                                    "bytes); prepare the corpus again")
        starts = np.memmap(self.docs_path, dtype="<i8", mode="r") if self.n_docs else np.zeros(0, np.int64)
        self.coarse = np.array(starts[::INDEX_STRIDE], dtype=np.int64)
        del starts
        self._fds: dict[str, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return self.n_tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if str(path) not in self._fds:
            self._fds[str(path)] = os.open(path, os.O_RDONLY)
        return self._fds[str(path)]

    def _pread(self, path: Path, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
        data = os.pread(self._fd(path), (hi - lo) * dtype.itemsize, lo * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._pread(self.tokens_path, self.dtype, lo, hi).astype(np.int32)

    def starts_in(self, lo: int, hi: int) -> np.ndarray:
        """Document starts s with lo <= s < hi: the coarse index bounds which block of offsets to read."""
        first = max(int(np.searchsorted(self.coarse, lo, "right")) - 1, 0) * INDEX_STRIDE
        last = min(int(np.searchsorted(self.coarse, hi, "left")) * INDEX_STRIDE, self.n_docs)
        block = self._pread(self.docs_path, np.dtype("<i8"), first, last)
        return block[(block >= lo) & (block < hi)].astype(np.int64)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def open_prepared(corpus_dir: str | Path, tokenizer=None) -> TokenStream:
    """The stream of a prepared corpus; refuses one prepared with another tokenizer than `tokenizer`."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataFileError(f"{corpus_dir / MANIFEST}: format version {manifest.get('format_version')}, this code "
                            f"reads {FORMAT_VERSION}; prepare the corpus again")
    if tokenizer is not None and manifest["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise DataFileError(
            f"{corpus_dir / MANIFEST}: the corpus was prepared with another tokenizer (fingerprint "
            f"{manifest['tokenizer_fingerprint'][:16]}, this run's is {tokenizer.fingerprint()[:16]}); prepare it "
            "again with this run's tokenizer or set tokenizer.path to the one it was prepared with")
    shards = [DiskShard(corpus_dir / s["tokens_file"], corpus_dir / s["docs_file"], s["tokens"], s["documents"],
                        manifest["dtype"]) for s in manifest["shards"]]
    return TokenStream(shards)


# --- writing -------------------------------------------------------------------------------------------


def with_eos(values: np.ndarray, offsets: np.ndarray, eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of n documents (`offsets`, n + 1) -> ids with EOS after each document, and each one's start."""
    n = len(offsets) - 1
    out = np.empty(len(values) + n, dtype=dtype)
    eos_at = offsets[1:] + np.arange(n)
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[eos_at] = True
    out[is_eos], out[~is_eos] = eos_id, values
    return out, offsets[:-1] + np.arange(n)


class ShardWriter:
    """Appends documents to `shard-NNNNN.*` files in `directory`, starting a new shard past `shard_tokens`."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._files = None

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self.shards.append({"tokens_file": f"{name}.tokens", "docs_file": f"{name}.docs", "tokens": 0, "documents": 0})
        self._files = tuple(open(self.directory / self.shards[-1][k], "wb") for k in ("tokens_file", "docs_file"))

    def write(self, values: np.ndarray, offsets: np.ndarray, eos_id: int) -> None:
        ids, starts = with_eos(values, offsets.astype(np.int64), eos_id, self.dtype)
        while len(starts):  # a shard ends at the first document boundary past `shard_tokens`
            if self._files is None:
                self._open()
            shard = self.shards[-1]
            k = max(int(np.searchsorted(starts, self.shard_tokens - shard["tokens"], "left")), 1)
            cut = int(starts[k]) if k < len(starts) else len(ids)
            self._files[0].write(ids[:cut].tobytes())
            self._files[1].write((starts[:k] + shard["tokens"]).astype("<i8").tobytes())
            shard["tokens"] += cut
            shard["documents"] += k
            ids, starts = ids[cut:], starts[k:] - cut
            if shard["tokens"] >= self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None


def file_sources(files: Sequence[str | Path]) -> list[dict]:
    paths = [check_data_file(f) for f in files]
    return [{"path": str(p.resolve()), "sha256": file_hash(p), "bytes": p.stat().st_size} for p in paths]


def same_preparation(manifest: dict, wanted: dict) -> bool:
    return all(manifest.get(k) == v for k, v in wanted.items())


def publish(tmp: Path, out: Path) -> None:
    """Move the finished corpus into place with one rename; a concurrent preparer that won keeps its copy."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published the same corpus first


def write_corpus(out: Path, wanted: dict, batches: Iterable[tuple[np.ndarray, np.ndarray]], tokenizer,
                 shard_tokens: int) -> dict:
    """Write the shards of `batches` ((flat ids, offsets) per batch of documents), then the manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is meant to be shared
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        writer = ShardWriter(tmp, dtype, shard_tokens)
        for values, offsets in batches:
            writer.write(values, offsets, tokenizer.eos_id)
        writer.close()
        if not writer.shards:
            raise DataFileError(f"no documents to prepare from {[s.get('path', s) for s in wanted['sources']]}")
        manifest = {**wanted, "dtype": dtype.str, "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
                    "documents": sum(s["documents"] for s in writer.shards),
                    "tokens": sum(s["tokens"] for s in writer.shards), "shards": writer.shards,
                    "bytes": sum((tmp / s[k]).stat().st_size for s in writer.shards for k in ("tokens_file", "docs_file"))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
