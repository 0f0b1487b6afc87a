"""Data path at scale: corpus preparation rate, loader tokens/s by worker count, peak resident memory by size.

    python -m benchmarks.data_bench --files ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2/test.txt \
        ../shared/data/tinyshakespeare/input.txt --work /tmp/data_bench --real-tokens 20000000 \
        --total-tokens 200000000 --out benchmarks/results/data_cpu.jsonl

1. Tokenise about `--real-tokens` tokens for real with `prepare_corpus(num_proc=--num-proc)`: the source files are
   concatenated, repeated, into text files under `--work` (real text, repeated; the tokenizer does all the work),
   and the rate per core is tokens / seconds / num_proc.
2. Build the `--total-tokens` corpus by repeating that corpus's shards (hard links + a manifest listing each
   shard several times), so reading it is reading a corpus of that size.
3. For each corpus size and worker count, a fresh process opens the corpus and iterates the training loader
   (windows sampled from the stream, random-length split, `cu_seqlens`): tokens/s, and the peak resident memory of
   that process (ru_maxrss) and of its worker processes.
Artefacts stay under `--work`; one JSON line per measurement goes to `--out` (`bench: "data"`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit
from illada_lightning.data.corpus import read_documents
from illada_lightning.data.datamodule import WindowBatchMaker
from illada_lightning.data.loader import EpochBatchSampler, ResumableLoader
from illada_lightning.data.prepare import prepare_corpus
from illada_lightning.data.prepared import MANIFEST, open_prepared
from illada_lightning.data.tokenizer import Tokenizer, train_tokenizer_from_iterator
from illada_lightning.provenance import git_commit


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", nargs="+", help="source text files (real text, repeated to size)")
    p.add_argument("--work", default="/tmp/data_bench")
    p.add_argument("--real-tokens", type=int, default=20_000_000)
    p.add_argument("--total-tokens", type=int, default=200_000_000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200, help="batches timed per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child: a corpus directory to read
    return p.parse_args(argv)


def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """VmRSS (now) or VmHWM (peak) of a process in MB. VmHWM starts afresh at exec, unlike ru_maxrss, which
    Linux carries over from the parent that started the process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024.0


def child_pids() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def make_sources(files, work: Path, target_tokens: int, tokenizer) -> tuple[list[Path], int]:
    """Text files under `work` holding the sources repeated to about `target_tokens` tokens."""
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    per_copy = sum(len(ids) + 1 for ids in tokenizer.encode_batch(read_documents(files)["text"]))
    copies = max(1, round(target_tokens / per_copy))
    paths, per_file = [], max(1, copies // 8)
    for k in range(0, copies, per_file):
        path = work / f"source-{k:04d}.txt"
        path.write_text("\n\n".join([text] * min(per_file, copies - k)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths, copies


def repeat_corpus(src: Path, dst: Path, factor: int) -> dict:
    """A corpus whose stream is `src`'s stream `factor` times (shard files hard-linked, not copied)."""
    manifest = json.loads((src / MANIFEST).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for r in range(factor):
        for s in manifest["shards"]:
            entry = dict(s)
            for key in ("tokens_file", "docs_file"):
                entry[key] = f"r{r:03d}-{s[key]}"
                if not (dst / entry[key]).exists():
                    os.link(src / s[key], dst / entry[key])
            shards.append(entry)
    repeated = {**manifest, "shards": shards, "tokens": manifest["tokens"] * factor,
                "documents": manifest["documents"] * factor, "bytes": manifest["bytes"] * factor,
                "sources": [{"repeated": str(src), "times": factor}]}
    (dst / MANIFEST).write_text(json.dumps(repeated))
    return repeated


def measure_loader(corpus: Path, tokenizer_dir: Path, args) -> dict:
    """In this (fresh) process: open the corpus and time `args.batches` training batches."""
    baseline = proc_status_mb("VmRSS")  # the interpreter, torch, datasets, lightning: before any data is touched
    tokenizer = Tokenizer.load(tokenizer_dir)
    stream = open_prepared(corpus, tokenizer)
    maker = WindowBatchMaker(stream, args.window, 0.3, 0, tokenizer.pad_id, train=True)
    sampler = EpochBatchSampler(len(maker), args.batch_size, seed=0)
    loader = ResumableLoader(sampler, maker, args.workers[0])
    it = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch (workers restart per epoch)
    next(it)  # workers started, first batch built
    began, n_tokens = time.perf_counter(), 0
    for _ in range(args.batches):
        batch = next(it)
        n_tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - began
    workers = [proc_status_mb("VmHWM", pid) for pid in child_pids()]  # before the workers exit
    it.close()
    peak = proc_status_mb("VmHWM")
    return {"corpus_tokens": stream.n_tokens, "loader_tokens_per_s": n_tokens / seconds, "seconds": seconds,
            "tokens_read": n_tokens, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
            "data_path_rss_mb": peak - baseline, "load_average_1m": os.getloadavg()[0],
            "peak_worker_rss_mb": max(workers) if workers else None, "n_worker_processes": len(workers)}


def child_measurement(corpus: Path, tokenizer_dir: Path, workers: int, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_bench", "--measure", str(corpus), "--work", args.work,
           "--window", str(args.window), "--batch-size", str(args.batch_size), "--batches", str(args.batches),
           "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"loader measurement failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    work = Path(args.work)
    if args.measure:
        print(json.dumps(measure_loader(Path(args.measure), work / "tokenizer", args)))
        return []
    work.mkdir(parents=True, exist_ok=True)
    docs = read_documents(args.files)["text"]
    tokenizer = train_tokenizer_from_iterator(docs, args.vocab_size)
    tokenizer.save(work / "tokenizer")
    sources, copies = make_sources(args.files, work, args.real_tokens, tokenizer)
    real = work / "corpus-real"
    reused = (real / MANIFEST).is_file()  # a second run re-measures the loader only
    began = time.perf_counter()
    manifest = prepare_corpus(real, tokenizer, files=sources, num_proc=args.num_proc)
    prep_s = time.perf_counter() - began
    common = {"bench": "data", "commit": git_commit(), "cpu_cores": os.cpu_count(), "window": args.window,
              "batch_size": args.batch_size, "source": [Path(f).name for f in args.files]}
    rows = []
    if not reused:
        rows.append({**common, "kind": "prepare", "corpus_tokens": manifest["tokens"], "workers": args.num_proc,
                     "documents": manifest["documents"], "prepare_s": prep_s, "source_copies": copies,
                     "tokens_per_s": manifest["tokens"] / prep_s,
                     "tokens_per_s_per_core": manifest["tokens"] / prep_s / args.num_proc,
                     "disk_bytes_per_token": manifest["bytes"] / manifest["tokens"], "loader_tokens_per_s": None,
                     "peak_rss_mb": proc_status_mb("VmHWM"),
                     "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
                     "load_average_1m": os.getloadavg()[0]})
        emit(rows[-1], args.out)
    factor = max(1, round(args.total_tokens / manifest["tokens"]))
    corpora = [(real, 1), (work / "corpus-repeated", factor)] if factor > 1 else [(real, 1)]
    if factor > 1:
        repeat_corpus(real, work / "corpus-repeated", factor)
    for corpus, times in corpora:
        for workers in args.workers:
            result = child_measurement(corpus, work / "tokenizer", workers, args)
            rows.append({**common, "kind": "loader", "workers": workers, "repeated_times": times, **result})
            emit(rows[-1], args.out)
    print(f"{'kind':8} {'corpus tokens':>14} {'workers':>7} {'loader tok/s':>13} {'peak RSS MB':>12} "
          f"{'data path MB':>12} {'worker RSS MB':>13}")
    for r in rows:
        tps = f"{r['loader_tokens_per_s']:,.0f}" if r["loader_tokens_per_s"] else "-"
        wrss = f"{r['peak_worker_rss_mb']:.0f}" if r.get("peak_worker_rss_mb") else "-"
        delta = f"{r['data_path_rss_mb']:.1f}" if "data_path_rss_mb" in r else "-"
        print(f"{r['kind']:8} {r['corpus_tokens']:>14,} {r['workers']:>7} {tps:>13} {r['peak_rss_mb']:>12.0f} "
              f"{delta:>12} {wrss:>13}")
    return rows


if __name__ == "__main__":
    main()
