"""Prepared corpus on disk (issue 19): same tokens as the in-memory path, manifest, no-op re-run, clear errors,
disjoint rank shares, exact resume with another worker count, and the streamed parquet path."""

import json

import datasets
import numpy as np
import pytest
import torch

from illada_lightning.data.config import DataConfig
from illada_lightning.data.corpus import DataFileError, file_hash, load_tokenized_documents
from illada_lightning.data.datamodule import PretrainDataModule
from illada_lightning.data.loader import EpochBatchSampler, ResumableLoader
from illada_lightning.data.prepare import prepare_corpus
from illada_lightning.data.prepared import MANIFEST, open_prepared
from illada_lightning.data.stream import TokenStream, epoch_offset, train_window_starts
from illada_lightning.data.streaming import stream_documents
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.model.attention import check_cu_seqlens

WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings sing of apples and pears".split()


def random_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    docs = random_docs(400, 0)
    (root / "a.txt").write_text("\n\n".join(docs[:250]) + "\n")
    (root / "b.txt").write_text("\n\n".join(docs[250:]) + "\n")
    tok = train_tokenizer_from_iterator(docs, vocab_size=320)
    prepare_corpus(root / "c", tok, files=[root / "a.txt", root / "b.txt"], num_proc=2, shard_tokens=1500)
    return root, tok


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "cu_seqlens")) and a["max_seqlen"] == b["max_seqlen"]


def test_prepared_stream_equals_in_memory(corpus):
    root, tok = corpus
    files = [root / "a.txt", root / "b.txt"]
    disk = open_prepared(root / "c", tok)
    memory = TokenStream.from_documents(load_tokenized_documents(files, tok, cache_dir=None), tok.eos_id)
    assert len(disk.shards) > 2 and disk.n_tokens == memory.n_tokens  # several shards, one stream
    for a, b in zip(disk.read(0, disk.n_tokens), memory.read(0, memory.n_tokens)):
        np.testing.assert_array_equal(a, b)
    for start in (0, 1499, 1500, 2999, disk.n_tokens - 7):  # windows across shard ends and the wrap
        for a, b in zip(disk.window(start, 64), memory.window(start, 64)):
            np.testing.assert_array_equal(a, b)
    manifest = json.loads((root / "c" / MANIFEST).read_text())
    assert manifest["tokens"] == disk.n_tokens and manifest["documents"] == 400
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint() and manifest["dtype"] == "<u2"
    assert [s["sha256"] for s in manifest["sources"]] == [file_hash(f) for f in files]
    assert sum(s["tokens"] for s in manifest["shards"]) == disk.n_tokens


def test_rerun_is_a_noop_and_a_different_corpus_is_refused(corpus):
    root, tok = corpus
    before = {p.name: p.stat().st_mtime_ns for p in (root / "c").iterdir()}
    prepare_corpus(root / "c", tok, files=[root / "a.txt", root / "b.txt"], num_proc=2, shard_tokens=1500)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "c").iterdir()} == before
    with pytest.raises(DataFileError, match=r"c/manifest.json: .* holds a corpus prepared from other sources"):
        prepare_corpus(root / "c", tok, files=[root / "a.txt"])
    assert {p.name: p.stat().st_mtime_ns for p in (root / "c").iterdir()} == before  # nothing lost


def test_other_tokenizer_is_refused(corpus):
    root, _ = corpus
    other = train_tokenizer_from_iterator(random_docs(50, 9), vocab_size=300)
    with pytest.raises(DataFileError, match=r"c/manifest.json: the corpus was prepared with another tokenizer"):
        open_prepared(root / "c", other)


def test_missing_manifest_and_truncated_shard_are_named(corpus, tmp_path):
    root, tok = corpus
    with pytest.raises(DataFileError, match=rf"{tmp_path}/manifest.json not found"):
        open_prepared(tmp_path, tok)
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in (root / "c").iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = broken / "shard-00001.tokens"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataFileError, match=r"broken/shard-00001.tokens: truncated or damaged shard"):
        open_prepared(broken, tok)


def prepared_datamodule(root, tok, num_workers=0, batch_size=4):
    cfg = DataConfig(train_files=[], train_corpus=str(root / "c"), val_files=[], num_workers=num_workers)
    dm = PretrainDataModule(cfg, tok, max_seq_len=48, batch_size=batch_size, seed=3)
    dm.setup("fit")
    return dm


def test_two_ranks_read_disjoint_windows_that_cover_the_epoch(corpus):
    root, tok = corpus
    dm = prepared_datamodule(root, tok)
    n_windows, maker = dm._n_train, dm._train_maker
    batches_per_rank = -(-n_windows // 4) // 2
    seen = []
    for rank in (0, 1):
        sampler = EpochBatchSampler(n_windows, 4, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(1)
        items = np.concatenate(sampler.batches(1))
        assert len(sampler) == batches_per_rank
        seen.append(set(train_window_starts(items, 3, 1, maker.stream.n_tokens, 48).tolist()))
        loader = ResumableLoader(sampler, maker)
        assert sum(b["input_ids"].shape[0] for b in loader) == len(items)
    assert not seen[0] & seen[1]  # disjoint
    all_starts = set(train_window_starts(np.arange(n_windows), 3, 1, maker.stream.n_tokens, 48).tolist())
    assert len(seen[0] | seen[1]) >= n_windows - 4 * 2 and seen[0] | seen[1] <= all_starts  # the epoch, cut evenly


@pytest.mark.parametrize("workers_before, workers_after", [(0, 2), (2, 0)])
def test_resume_mid_epoch_with_another_worker_count(corpus, workers_before, workers_after):
    root, tok = corpus
    reference = prepared_datamodule(root, tok).train_dataloader()
    expected = list(reference) + list(reference)
    interrupted = prepared_datamodule(root, tok, num_workers=workers_before).train_dataloader()
    it = iter(interrupted)
    for _ in range(5):
        next(it)
    state = interrupted.state_dict()
    resumed = prepared_datamodule(root, tok, num_workers=workers_after).train_dataloader()
    resumed.load_state_dict(state)
    got = list(resumed) + list(resumed)
    assert len(got) == len(expected) - 5 and all(same(a, b) for a, b in zip(got, expected[5:]))


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    docs = random_docs(240, 5)
    paths = []
    for k in range(4):
        path = root / f"part-{k}.parquet"
        datasets.Dataset.from_dict({"body": docs[k * 60 : (k + 1) * 60]}).to_parquet(str(path))
        paths.append(path)
    return paths, docs, train_tokenizer_from_iterator(docs, vocab_size=320)


def test_streamed_parquet_gives_the_prepared_tokens(parquet_shards, tmp_path):
    paths, _, tok = parquet_shards
    prepare_corpus(tmp_path / "c", tok, files=paths, text_field="body")
    prepared, _ = open_prepared(tmp_path / "c", tok).read(0, open_prepared(tmp_path / "c", tok).n_tokens)
    cfg = DataConfig(train_files=[str(p) for p in paths], val_files=[], text_field="body", streaming=True,
                     p_split=0.0)
    dm = PretrainDataModule(cfg, tok, max_seq_len=32, batch_size=3, seed=12)
    loader = dm.train_dataloader()
    batches = list(loader)
    streamed = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    skip = epoch_offset(12, 0, 32)
    assert epoch_offset(12, 1, 32) != skip  # so the next epoch is cut elsewhere
    assert len(streamed) >= len(prepared) - skip - 3 * 32 * 2
    np.testing.assert_array_equal(streamed, prepared[skip : skip + len(streamed)])
    for b in batches:  # documents isolated: a segment ends after every EOS
        check_cu_seqlens(b["cu_seqlens"], *b["input_ids"].shape)
        cu, flat = set(b["cu_seqlens"].tolist()), b["input_ids"].reshape(-1)
        assert all(int(e) + 1 in cu for e in (flat == tok.eos_id).nonzero().flatten())
    # the next epoch starts at another cut; resume skips to the exact batch
    assert not same(next(iter(loader)), batches[0])
    resumed = PretrainDataModule(cfg, tok, max_seq_len=32, batch_size=3, seed=12).train_dataloader()
    resumed.load_state_dict({"epoch": 0, "position": 2, "seed": 12, "batch_size": 3, "window": 32})
    assert all(same(a, b) for a, b in zip(resumed, batches[2:]))


def test_hub_preparation_streams_the_same_tokens(parquet_shards, tmp_path):
    """The hub path (datasets streaming, nothing downloaded first) run offline on local parquet shards."""
    paths, _, tok = parquet_shards
    from_files = prepare_corpus(tmp_path / "files", tok, files=paths, text_field="body")
    from_stream = prepare_corpus(tmp_path / "hub", tok, hub_name="parquet", hub_data_files=paths, text_field="body")
    assert from_stream["tokens"] == from_files["tokens"] and from_stream["documents"] == from_files["documents"]
    a, b = open_prepared(tmp_path / "files", tok), open_prepared(tmp_path / "hub", tok)
    for x, y in zip(a.read(0, a.n_tokens), b.read(0, b.n_tokens)):
        np.testing.assert_array_equal(x, y)


def test_streamed_ranks_read_disjoint_documents(parquet_shards):
    paths, docs, _ = parquet_shards
    shares = [list(stream_documents("parquet", "train", "body", data_files=[str(p) for p in paths], rank=r,
                                    world_size=2)) for r in (0, 1)]
    texts = [{d["text"] for d in share} for share in shares]
    assert texts[0] and texts[1] and not texts[0] & texts[1] and texts[0] | texts[1] == set(docs)


def test_data_config_refuses_bad_corpus_keys():
    with pytest.raises(ValueError, match="data.streaming: .* cannot be combined with data.train_corpus"):
        DataConfig(train_corpus="corpora/x", streaming=True).validate()
    with pytest.raises(ValueError, match="data.num_proc: must be >= 1, got 0"):
        DataConfig(num_proc=0).validate()
    with pytest.raises(ValueError, match="data.train_files: is empty and neither data.hub_name nor data.train_corpus"):
        DataConfig(train_files=[]).validate()
    DataConfig(train_files=[], train_corpus="corpora/x").validate()


def test_streaming_refuses_plain_text_files(corpus):
    root, tok = corpus
    cfg = DataConfig(train_files=[str(root / "a.txt")], val_files=[], streaming=True)
    with pytest.raises(DataFileError, match="data.streaming reads jsonl or parquet train_files"):
        PretrainDataModule(cfg, tok, max_seq_len=32, batch_size=2).setup("fit")  # before training starts


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resumes_a_stream_exactly(parquet_shards, tmp_path):
    """Lightning fetches one batch ahead of a loader without a length: the saved position must count the
    batches trained on, also when the checkpoint falls on an epoch's last step."""
    import lightning as L

    from tests.test_data_datamodule import Recorder

    paths, _, tok = parquet_shards
    cfg = DataConfig(train_files=[str(paths[0])], val_files=[], text_field="body", streaming=True)

    def fit(root, max_steps, ckpt_path=None):
        model = Recorder()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=root, enable_checkpointing=ckpt_path is None,
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                                dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")]
                            if ckpt_path is None else [])
        trainer.fit(model, datamodule=PretrainDataModule(cfg, tok, max_seq_len=64, batch_size=4, seed=12),
                    ckpt_path=ckpt_path)
        return [ids for ids, _ in model.seen]

    epoch_len = sum(1 for _ in PretrainDataModule(cfg, tok, max_seq_len=64, batch_size=4, seed=12).train_dataloader())
    assert 3 < epoch_len < 12
    full = fit(tmp_path / "full", epoch_len + 3)
    for step in (2, epoch_len - 1, epoch_len):
        resumed = fit(tmp_path / f"from{step}", epoch_len + 3, str(tmp_path / "full" / f"step={step}.ckpt"))
        assert len(resumed) == len(full) - step
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[step:]))


def test_prepare_data_cli(corpus, tmp_path, capsys):
    from experiments import prepare_data

    root, _ = corpus
    args = [f"out={tmp_path / 'cli'}", f"files=[{root / 'a.txt'}]", "tokenizer.vocab_size=300",
            f"cache_dir={tmp_path / 'cache'}", "shard_tokens=2000"]
    first = prepare_data.main(args)
    assert first["documents"] == 250 and len(first["shards"]) > 1
    assert "train with: pretrain.data.train_corpus=" in capsys.readouterr().out
    mtime = (tmp_path / "cli" / MANIFEST).stat().st_mtime_ns
    assert prepare_data.main(args) == first and (tmp_path / "cli" / MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="out= is required"):
        prepare_data.main([f"files=[{root / 'a.txt'}]"])
