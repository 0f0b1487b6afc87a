"""Byte-level BPE tokenizer with fixed special-token ids and the chat template.

Special tokens occupy ids 0..8 in every tokenizer this project trains, so a model config can name the pad,
EOS and mask ids before a tokenizer exists (`model/config.py`); `check_tokenizer_compatible` verifies the
pairing at run time. A released checkpoint's tokenizer keeps its own ids and Jinja template
(`checkpoint_tokenizer.py`).

Chat template. Each turn is `<|role|>\\n{content}\\n`; a generation prompt ends with `<|assistant|>\\n`. A
training example is `format_chat(messages up to the last user turn, add_generation_prompt=True)` followed
directly by the response text and one `<|eos|>` token (iLLaDA §2.2). Earlier assistant turns end with a
newline, not with `<|eos|>`: EOS means "the answer is finished" and appears exactly once per example.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>",
)
PAD, BOS, EOS, MASK = SPECIAL_TOKENS[:4]
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
TOKENIZER_FILE = "tokenizer.json"
# `Tokenizer.format_chat` written as Jinja: the template saved with our tokenizers in `tokenizer_config.json`
# (data/checkpoint_tokenizer.py, exported checkpoints), so they render the same text everywhere.
PROJECT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the project's special ids and chat template."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        self._tok = hf_tokenizer
        self._check_special_ids()
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (self.token_to_id(t) for t in (PAD, BOS, EOS, MASK))
        self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))

    def _check_special_ids(self) -> None:
        for expected, token in enumerate(SPECIAL_TOKENS):
            found = self._tok.token_to_id(token)
            if found != expected:
                raise ValueError(
                    f"tokenizer has special token {token!r} at id {found}, expected id {expected}; "
                    f"this project needs {list(SPECIAL_TOKENS)} at ids 0..{len(SPECIAL_TOKENS) - 1}"
                )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids. `add_special_tokens`
        prepends `<|bos|>`."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """Render chat messages (`{"role", "content"}`) with the template described in the module doc."""
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_TOKENS:
                raise ValueError(f"message {i}: role {role!r} is not one of {sorted(ROLE_TOKENS)}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            parts.append(f"{ROLE_TOKENS[role]}\n{content}\n")
        if add_generation_prompt:
            parts.append(f"{ROLE_TOKENS['assistant']}\n")
        return "".join(parts)

    def to_str(self) -> str:
        """The form embedded in checkpoints (`checkpoint_tokenizer.tokenizer_from_str` reads it back)."""
        return self._tok.to_str()

    def fingerprint(self) -> str:
        """Content hash: keys the tokenised-corpus cache."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, path_or_dir: str | Path) -> Tokenizer:
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from None
        return cls(hf)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _new_bpe(split_digits: bool = True) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # One token per digit (as LLaMA's tokenizer does): a number then reads the same in every context, and
    # sums are learnt digit by digit; BPE on prose merges arbitrary digit runs ("19", "200") otherwise.
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer_from_iterator(texts: Iterable[str], vocab_size: int, split_digits: bool = True) -> Tokenizer:
    """Byte-level BPE over `texts` (digits one token each unless `split_digits=False`); the special tokens
    come first, so they get ids 0..8."""
    tok = _new_bpe(split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def train_tokenizer(files: list[str], vocab_size: int, *, fmt: str = "auto", text_field: str = "text",
                    split_digits: bool = True) -> Tokenizer:
    """Train on corpus files (text, jsonl or parquet, read as documents by `corpus.read_documents`)."""
    from illada_lightning.data.corpus import read_documents  # corpus imports nothing from here; avoid a cycle

    docs = read_documents(files, fmt, text_field)
    log.info("training a %d-token byte-level BPE on %d documents from %s", vocab_size, len(docs), list(files))
    return train_tokenizer_from_iterator(docs["text"], vocab_size, split_digits)


def build_tokenizer(
    cfg, corpus_files: Sequence[str], *, fmt: str = "auto", text_field: str = "text",
    cache_dir: str | Path | None = ".cache/illada",
) -> Tokenizer:
    """The tokenizer a run uses (`cfg` is a `TokenizerConfig`): loaded from `cfg.path`, or trained on
    `cfg.train_files` (default: `corpus_files`) and cached by the files' content hashes and vocab size."""
    from illada_lightning.data.corpus import cache_key, check_data_file, file_hash, resolve_data_path

    if cfg.path:
        return Tokenizer.load(resolve_data_path(cfg.path))
    files = list(cfg.train_files or corpus_files)
    paths = [check_data_file(f) for f in files]
    cached = None
    if cache_dir is not None:
        key = cache_key("tokenizer", str(cfg.vocab_size), fmt, text_field, f"digits={cfg.split_digits}",
                        *(file_hash(p) for p in paths))
        cached = Path(cache_dir) / f"tokenizer-{key}"
        if (cached / TOKENIZER_FILE).is_file():
            return Tokenizer.load(cached)
    tokenizer = train_tokenizer([str(p) for p in paths], cfg.vocab_size, fmt=fmt, text_field=text_field,
                                split_digits=cfg.split_digits)
    if cached is not None:
        tokenizer.save(cached)
    return tokenizer


def check_tokenizer_compatible(tokenizer: Tokenizer, model_cfg) -> None:
    """Raise a ValueError when `tokenizer` cannot drive a model built from `model_cfg`."""
    problems = []
    if tokenizer.vocab_size > model_cfg.vocab_size:
        problems.append(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than model.vocab_size "
                        f"({model_cfg.vocab_size})")
    for name, tok_id, cfg_key in (
        ("mask", tokenizer.mask_id, "mask_token_id"),
        ("eos", tokenizer.eos_id, "eos_token_id"),
        ("pad", tokenizer.pad_id, "pad_token_id"),
    ):
        cfg_id = getattr(model_cfg, cfg_key)
        if tok_id != cfg_id:
            problems.append(f"tokenizer {name} id is {tok_id} but model.{cfg_key} is {cfg_id}")
    if problems:
        raise ValueError("tokenizer does not fit the model config: " + "; ".join(problems))
