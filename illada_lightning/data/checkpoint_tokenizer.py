"""A tokenizer whose special ids and chat template come with it (a released checkpoint's), not fixed at 0..8.

The released LLaDA tokenizer keeps its special tokens where its training put them (EOS 126081, mask 126336)
and its chat template is a Jinja string in `tokenizer_config.json`. `CheckpointTokenizer` carries those ids
and that template, so SFT formatting (prompt + response + EOS, iLLaDA §2.2; LLaDA's response-only baseline)
uses the checkpoint's EOS and template; the template is rendered as `transformers` renders it (sandboxed,
`trim_blocks`, `lstrip_blocks`).

Stored as the Hugging Face pair: `tokenizer.json` + `tokenizer_config.json` (the special tokens by name and
`chat_template`), which `load_tokenizer` reads back; embedded in a checkpoint as one JSON string
(`to_str` / `tokenizer_from_str`). A directory without `tokenizer_config.json`, or a plain `tokenizer.json`
string, is this project's own `Tokenizer` (ids 0..8), as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from illada_lightning.data.tokenizer import PROJECT_CHAT_TEMPLATE, ROLE_TOKENS, TOKENIZER_FILE, Tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
# attribute -> tokenizer_config.json key (the names `transformers` uses)
SPECIAL_KEYS = {"bos_id": "bos_token", "eos_id": "eos_token", "pad_id": "pad_token", "mask_id": "mask_token"}
ENVELOPE_KEY = "illada_checkpoint_tokenizer"  # marks the embedded form written by `to_str`


class CheckpointTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the special ids and Jinja chat template it was released with."""

    def __init__(self, hf_tokenizer: RustTokenizer, *, mask_id: int, eos_id: int, pad_id: int, bos_id: int,
                 chat_template: str | None):
        self._tok = hf_tokenizer  # no fixed-id check: the ids are the checkpoint's
        size = self.vocab_size
        for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id)):
            if not 0 <= value < size:
                raise ValueError(f"tokenizer {name}={value} is outside its vocabulary of {size} tokens")
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = pad_id, bos_id, eos_id, mask_id
        added = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(added | {pad_id, bos_id, eos_id, mask_id})
        self.chat_template = chat_template

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ValueError(f"this tokenizer's {TOKENIZER_CONFIG} has no chat_template")
        for i, message in enumerate(messages):
            if message.get("role") not in ROLE_TOKENS or not isinstance(message.get("content"), str):
                raise ValueError(f"message {i}: needs a role in {sorted(ROLE_TOKENS)} and string content")
        return _compile(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._tok.id_to_token(self.bos_id), eos_token=self._tok.id_to_token(self.eos_id))

    def special_tokens(self) -> dict[str, str]:
        """`{"bos_token": ..., "eos_token": ..., "pad_token": ..., "mask_token": ...}` by name; refuses an id
        whose token does not map back to it (the name would reload as another id)."""
        out = {}
        for attr, key in SPECIAL_KEYS.items():
            token = self._tok.id_to_token(getattr(self, attr))
            if token is None or self._tok.token_to_id(token) != getattr(self, attr):
                raise ValueError(f"tokenizer {attr}={getattr(self, attr)} has no token of its own to save as {key}")
            out[key] = token
        return out

    def tokenizer_config(self) -> dict:
        return {**self.special_tokens(), "chat_template": self.chat_template}

    def to_str(self) -> str:
        return json.dumps({ENVELOPE_KEY: 1, "tokenizer_json": self._tok.to_str(), **self.tokenizer_config()},
                          ensure_ascii=False)

    def fingerprint(self) -> str:
        """Content hash over the vocabulary, the special ids and the template (SFT formatting depends on all)."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """tokenizer_config.json first, then tokenizer.json: a reader that sees tokenizer.json sees both."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**(extra_config or {}), **self.tokenizer_config()}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def from_config(cls, hf_tokenizer: RustTokenizer, config: dict, where: str, **ids: int) -> CheckpointTokenizer:
        """From a `tokenizer_config.json` dict; `ids` (e.g. `mask_id=` from a model's config.json) take
        precedence over the config's token names. A special token neither gives is an error naming the key."""
        for attr, key in SPECIAL_KEYS.items():
            if attr not in ids:
                ids[attr] = token_id(hf_tokenizer, config.get(key), where, key)
        return cls(hf_tokenizer, chat_template=config.get("chat_template"), **ids)

    def __repr__(self) -> str:
        return f"CheckpointTokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, eos_id={self.eos_id})"


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    # Compiled once per template: an SFT set formats every example (compiling costs milliseconds each).
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def token_id(tok: RustTokenizer, entry, where: str, key: str) -> int:
    """The id of a `tokenizer_config.json` token entry (a string or `{"content": ...}`)."""
    if entry is None:
        raise ValueError(f"{where}: {key} is missing")
    content = entry.get("content") if isinstance(entry, dict) else entry
    found = tok.token_to_id(str(content))
    if found is None:
        raise ValueError(f"{where}: {key}={content!r} is not a token of {TOKENIZER_FILE}")
    return found


def as_checkpoint_tokenizer(tokenizer: Tokenizer) -> CheckpointTokenizer:
    """`tokenizer` with explicit ids and a Jinja template (this project's template for our own tokenizers)."""
    if isinstance(tokenizer, CheckpointTokenizer):
        return tokenizer
    return CheckpointTokenizer(tokenizer.backend, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, chat_template=PROJECT_CHAT_TEMPLATE)


def read_rust_tokenizer(path: Path) -> RustTokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return RustTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
        raise ValueError(f"cannot read tokenizer file {path}: {exc}") from None


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (tokenizer_config.json, config.json); ValueError naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """A saved tokenizer: `CheckpointTokenizer` when `tokenizer_config.json` sits beside `tokenizer.json`,
    else this project's `Tokenizer` (special ids 0..8)."""
    path = Path(path_or_dir)
    directory = path if path.is_dir() else path.parent
    config_path = directory / TOKENIZER_CONFIG
    if not config_path.is_file():
        return Tokenizer.load(path)
    rust = read_rust_tokenizer(directory / TOKENIZER_FILE if path.is_dir() else path)
    return CheckpointTokenizer.from_config(rust, read_json_object(config_path), str(config_path))


def tokenizer_from_str(text: str) -> Tokenizer:
    """The tokenizer embedded in a checkpoint: `CheckpointTokenizer.to_str`'s form, or a plain tokenizer.json
    string (this project's `Tokenizer`)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the checkpoint's embedded tokenizer is not valid JSON ({exc})") from None
    if isinstance(data, dict) and ENVELOPE_KEY in data:
        rust = RustTokenizer.from_str(data["tokenizer_json"])
        return CheckpointTokenizer.from_config(rust, data, "the checkpoint's embedded tokenizer")
    return Tokenizer(RustTokenizer.from_str(text))
