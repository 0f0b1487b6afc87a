"""DataModules: contract batches, determinism per (seed, epoch), mid-epoch resume (plain and through Lightning),
and one batch through the diffusion loss of a tiny model."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful

from illada_lightning.data.config import DataConfig
from illada_lightning.data.datamodule import PretrainDataModule
from illada_lightning.data.tokenizer import check_tokenizer_compatible, train_tokenizer_from_iterator
from illada_lightning.diffusion.objective import diffusion_loss
from illada_lightning.model.attention import check_cu_seqlens
from illada_lightning.model.build import build_model

WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings sing of apples and pears".split()


def make_corpus(path, n_docs, seed=0):
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(root / "train.txt", 300, 0)
    make_corpus(root / "valid.txt", 40, 1)
    tok = train_tokenizer_from_iterator(docs, vocab_size=320)
    return root, tok


def datamodule(corpus, batch_size=4, seed=0, max_seq_len=32, p_split=0.3, num_workers=0):
    root, tok = corpus
    cfg = DataConfig(train_files=[str(root / "train.txt")], val_files=[str(root / "valid.txt")], p_split=p_split,
                     cache_dir=str(root / "cache"), num_workers=num_workers)
    dm = PretrainDataModule(cfg, tok, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed)
    dm.setup("fit")
    return dm


def same(a, b):
    return (torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["cu_seqlens"], b["cu_seqlens"])
            and a["max_seqlen"] == b["max_seqlen"]
            and ((a["loss_mask"] is None and b["loss_mask"] is None)
                 or (a["loss_mask"] is not None and b["loss_mask"] is not None
                     and torch.equal(a["loss_mask"], b["loss_mask"]))))


def test_batches_follow_the_contract(corpus):
    dm = datamodule(corpus)
    loader = dm.train_dataloader()
    batches = list(loader)
    n_windows = dm.train_stream.n_tokens // 32
    assert len(batches) == len(loader) == -(-n_windows // 4)
    for b in batches:
        assert set(b) == {"input_ids", "cu_seqlens", "max_seqlen", "loss_mask"}
        B, Lr = b["input_ids"].shape
        assert b["input_ids"].dtype == torch.long and Lr == 32
        assert b["cu_seqlens"].dtype == torch.int32
        check_cu_seqlens(b["cu_seqlens"], B, Lr)
        assert isinstance(b["max_seqlen"], int)
        assert b["max_seqlen"] == int((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).max())
        assert b["loss_mask"] is None or (b["loss_mask"].dtype == torch.bool and b["loss_mask"].shape == (B, Lr))
    # an epoch is N // L full windows (no padding), each window once
    assert all(b["loss_mask"] is None for b in batches)
    assert sum(b["input_ids"].shape[0] for b in batches) == n_windows


def window_starts_of(dm, loader_batches):
    """Stream offsets of every training row: where the row's tokens occur in the (wrapped) stream."""
    stream, _ = dm.train_stream.read(0, dm.train_stream.n_tokens)
    views = np.lib.stride_tricks.sliding_window_view(np.concatenate([stream, stream[:32]]), 32)[: len(stream)]
    return [np.flatnonzero((views == row).all(axis=1)).tolist()
            for b in loader_batches for row in b["input_ids"].numpy()]


def test_windows_cut_afresh_every_epoch(corpus):
    """Issue 11.3: each epoch's windows start at a new random offset into the stream (seeded by seed, epoch)."""
    dm = datamodule(corpus, p_split=0.0)
    loader = dm.train_dataloader()
    epochs = [list(loader) for _ in range(3)]
    n = dm.train_stream.n_tokens
    cuts = []
    for batches in epochs:
        starts = window_starts_of(dm, batches)
        assert all(len(h) == 1 for h in starts)  # every row is one stretch of the (wrapped) stream
        starts = sorted(h[0] for h in starts)
        assert len(starts) == n // 32
        # the windows are one cut of the stream: consecutive, L apart, from one offset (mod N)
        gaps = np.diff(np.array(starts + [starts[0] + n]))
        assert sorted(gaps.tolist())[:-1] == [32] * (len(starts) - 1)
        cuts.append(frozenset(starts))
    assert len(set(cuts)) == 3  # three epochs, three different sets of row boundaries
    again = datamodule(corpus, p_split=0.0).train_dataloader()
    again.sampler.set_epoch(2)
    assert all(same(x, y) for x, y in zip(epochs[2], again))  # deterministic for (seed, epoch)


def test_deterministic_per_seed_and_epoch(corpus):
    a, b = datamodule(corpus).train_dataloader(), datamodule(corpus).train_dataloader()
    epoch0_a, epoch0_b = list(a), list(b)
    assert all(same(x, y) for x, y in zip(epoch0_a, epoch0_b))
    epoch1_a = list(a)  # a second pass is the next epoch: a new order
    assert not all(same(x, y) for x, y in zip(epoch0_a, epoch1_a))
    b.sampler.set_epoch(1)  # what Lightning calls at each epoch start
    assert all(same(x, y) for x, y in zip(epoch1_a, b))
    other = datamodule(corpus, seed=1).train_dataloader()
    assert not all(same(x, y) for x, y in zip(epoch0_a, other))


@pytest.mark.parametrize("stop_after", [0, 3, 7])
def test_resume_from_state_equals_uninterrupted(corpus, stop_after):
    reference = datamodule(corpus).train_dataloader()
    expected = list(reference) + list(reference)  # epochs 0 and 1

    interrupted = datamodule(corpus).train_dataloader()
    it = iter(interrupted)
    for _ in range(stop_after):
        next(it)
    state = interrupted.state_dict()
    assert state["position"] == stop_after and state["epoch"] == 0

    resumed = datamodule(corpus).train_dataloader()  # a fresh process: new datamodule, new loader
    assert isinstance(resumed, _Stateful)  # what Lightning checks before saving / restoring loader state
    resumed.load_state_dict(state)
    got = list(resumed) + list(resumed)  # rest of epoch 0, then all of epoch 1
    assert len(got) == len(expected) - stop_after
    assert all(same(x, y) for x, y in zip(got, expected[stop_after:]))


def test_resume_rejects_a_different_setup(corpus):
    state = datamodule(corpus).train_dataloader().state_dict()
    with pytest.raises(ValueError, match="checkpoint has batch_size=4, this run has batch_size=8"):
        datamodule(corpus, batch_size=8).train_dataloader().load_state_dict(state)


def test_workers_give_the_same_batches(corpus):
    serial = list(datamodule(corpus).train_dataloader())
    parallel = list(datamodule(corpus, num_workers=2).train_dataloader())
    assert len(serial) == len(parallel) and all(same(x, y) for x, y in zip(serial, parallel))


def test_validation_batches_fixed_and_unsplit(corpus):
    dm = datamodule(corpus)
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == len(second) > 0 and all(same(x, y) for x, y in zip(first, second))
    assert not isinstance(dm.val_dataloader(), _Stateful)
    # no random split: segment ends are document ends (EOS), row ends or the padding
    for b in first:
        flat, Lr = b["input_ids"].reshape(-1), b["input_ids"].shape[1]
        for end in b["cu_seqlens"][1:].tolist():
            assert end % Lr == 0 or flat[end - 1] == corpus[1].eos_id or flat[end] == corpus[1].pad_id


class Recorder(L.LightningModule):
    """Trains nothing useful; records what each step received."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["input_ids"].clone(), batch["cu_seqlens"].clone()))
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(corpus, tmp_path, max_steps, ckpt_path=None, every=None):
    model = Recorder()
    callbacks = []
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                        limit_val_batches=0, default_root_dir=tmp_path)
    dm = datamodule(corpus, batch_size=64)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, len(dm.train_dataloader())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resumes_mid_epoch(corpus, tmp_path):
    full, epoch_len = fit(corpus, tmp_path / "full", max_steps=9, every=None)
    assert 3 < epoch_len < 9  # the run crosses an epoch boundary
    plain = datamodule(corpus, batch_size=64).train_dataloader()
    expected = (list(plain) + list(plain))[:9]  # epoch 0, then epoch 1 in a new order (Lightning's set_epoch)
    assert all(torch.equal(ids, e["input_ids"]) and torch.equal(cu, e["cu_seqlens"])
               for (ids, cu), e in zip(full, expected))
    _, _ = fit(corpus, tmp_path / "a", max_steps=3, every=3)
    ckpt = tmp_path / "a" / "step=3.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 3
    resumed, _ = fit(corpus, tmp_path / "b", max_steps=9, ckpt_path=str(ckpt))
    assert len(resumed) == 6
    for (ids_a, cu_a), (ids_b, cu_b) in zip(resumed, full[3:]):
        assert torch.equal(ids_a, ids_b) and torch.equal(cu_a, cu_b)


def test_batch_through_diffusion_loss(corpus):
    tok = corpus[1]
    vocab = -(-tok.vocab_size // 64) * 64
    model = build_model("tiny", vocab_size=vocab, max_seq_len=32, n_layers=2, attention_backend="sdpa")
    check_tokenizer_compatible(tok, model.config)
    loader = datamodule(corpus, p_split=1.0).train_dataloader()
    for batch in loader:
        if batch["loss_mask"] is not None:  # the padded last batch exercises loss_mask too
            break
    out = diffusion_loss(model, batch["input_ids"], mask_token_id=tok.mask_id, cu_seqlens=batch["cu_seqlens"],
                         max_seqlen=batch["max_seqlen"], loss_mask=batch["loss_mask"],
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
