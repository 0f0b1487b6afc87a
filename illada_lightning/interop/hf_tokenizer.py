"""A Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`) as our `Tokenizer`.

The released LLaDA tokenizer keeps its special tokens where its training put them (EOS 126081, mask 126336)
and its chat template is a Jinja string in `tokenizer_config.json`; our own tokenizers pin the special ids to
0..8 and render a fixed template. `HFDirTokenizer` takes the ids from the checkpoint's config (the model's
mask/EOS/pad ids are what it was trained with) and renders the Jinja template as `transformers` does
(sandboxed, `trim_blocks` and `lstrip_blocks`).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from ..data.tokenizer import ROLE_TOKENS, Tokenizer
from ..model.config import ModelConfig
from . import HFCheckpointError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Our fixed template (data/tokenizer.py `format_chat`) written as Jinja for exported checkpoints.
PROJECT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class HFDirTokenizer(Tokenizer):
    """A tokenizer whose special ids and chat template come from a checkpoint directory."""

    def __init__(self, hf_tokenizer: RustTokenizer, *, mask_id: int, eos_id: int, pad_id: int, bos_id: int,
                 chat_template: str | None):
        self._tok = hf_tokenizer  # no fixed-id check: the ids are the checkpoint's
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = pad_id, bos_id, eos_id, mask_id
        added = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(added.values()) | {pad_id, bos_id, eos_id, mask_id}
        self.chat_template = chat_template

    def format_chat(self, messages, add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ValueError(f"this checkpoint's {TOKENIZER_CONFIG} has no chat_template")
        for i, message in enumerate(messages):
            if message.get("role") not in ROLE_TOKENS or not isinstance(message.get("content"), str):
                raise ValueError(f"message {i}: needs a role in {sorted(ROLE_TOKENS)} and string content")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._tok.id_to_token(self.bos_id), eos_token=self._tok.id_to_token(self.eos_id))

    def __repr__(self) -> str:
        return f"HFDirTokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, eos_id={self.eos_id})"


def _token_id(tok: RustTokenizer, entry, where: str, key: str) -> int | None:
    """The id of a `tokenizer_config.json` token entry (a string or `{"content": ...}`), None if absent."""
    if entry is None:
        return None
    content = entry.get("content") if isinstance(entry, dict) else entry
    found = tok.token_to_id(str(content))
    if found is None:
        raise HFCheckpointError(f"{where}: {key}={content!r} is not a token of {TOKENIZER_JSON}")
    return found


def load_tokenizer_dir(directory: str | Path, cfg: ModelConfig) -> HFDirTokenizer:
    """The checkpoint's tokenizer, checked against the weights (`cfg` from its config.json)."""
    directory = Path(directory)
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise HFCheckpointError(f"{path}: tokenizer file is missing")
    try:
        tok = RustTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
        raise HFCheckpointError(f"{path}: cannot read the tokenizer ({exc})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise HFCheckpointError(f"{path}: vocabulary of {size} tokens does not fit the weights' {cfg.vocab_size} "
                                "embedding rows (config.json embedding_size/vocab_size)")
    for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) >= size:
            raise HFCheckpointError(f"config.json: {key}={getattr(cfg, key)} is outside the vocabulary of {path} "
                                    f"({size} tokens)")
    config_path = directory / TOKENIZER_CONFIG
    extra = {}
    if config_path.is_file():
        try:
            extra = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise HFCheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    bos = _token_id(tok, extra.get("bos_token"), str(config_path), "bos_token")
    return HFDirTokenizer(tok, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                          bos_id=cfg.eos_token_id if bos is None else bos, chat_template=extra.get("chat_template"))


def write_tokenizer_dir(tokenizer: Tokenizer, directory: Path, cfg: ModelConfig) -> None:
    """tokenizer.json and a tokenizer_config.json (special tokens, chat template) for `transformers`."""
    tokenizer.backend.save(str(directory / TOKENIZER_JSON))
    token = tokenizer.backend.id_to_token
    template = getattr(tokenizer, "chat_template", None) or PROJECT_CHAT_TEMPLATE
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
        "bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
        "pad_token": token(tokenizer.pad_id), "mask_token": token(tokenizer.mask_id),
        "clean_up_tokenization_spaces": False, "chat_template": template,
    }
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
