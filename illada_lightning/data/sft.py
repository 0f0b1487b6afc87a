"""Instruction data: records, chat formatting, and the two SFT layouts.

Records (jsonl, one object a line): `{"prompt": str, "response": str}` or `{"messages": [{"role", "content"},
...]}` with roles user/assistant/system, ending with an assistant turn. Anything else is an error naming the
file and line.

Every example is `format_chat(history, add_generation_prompt=True)` (the prompt) followed directly by the
response and one `<|eos|>`; prompt and response are tokenised separately, which is how a prompt is encoded at
inference.

- ``whole_window`` (iLLaDA §2.2): all examples, each ending with its single EOS, are concatenated into one
  stream ("a continuous instruction corpus"); training windows of `max_seq_len` are sampled from it afresh each
  epoch (`stream.py`) and masked whole (loss_mask None), with the same random-length split as pretraining.
  With `attention=window` (default, the paper's reading) a window is one attention segment: an example's EOS is
  followed by the next example's prompt in the same context, which is what variable-length block generation
  (§2.3) needs, since the model must predict EOS mid-block and then fill the rest of the block. With
  `attention=per_example` (the ablation) every example is its own `cu_seqlens` segment, as pretraining keeps
  documents apart (§2.1). A dialogue is one example (its whole history as the prompt, the last assistant turn
  as the response).
- ``response_only`` (LLaDA §2.3 and Appendix B.1, the baseline): one example per row; the prompt is visible
  (loss_mask False), the response + EOS is maskable and padded with EOS up to the batch's longest row; the
  padding EOS are part of the response (maskable, in the loss). The objective normalises each row by its
  number of maskable tokens, i.e. by answer length. With `multi_turn_split`, an n-turn dialogue becomes n
  pairs (p0, r0), (p0 r0 p1, r1), ... (LLaDA B.1); LLaDA samples one of them per dialogue, we keep all n so
  every turn is seen each epoch. Examples longer than `max_seq_len` are truncated (counted and logged); if
  every example is too long the configuration is wrong and an error says so before training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from illada_lightning.data.corpus import (
    DataFileError,
    cache_key,
    check_data_file,
    column_to_arrays,
    file_hash,
    read_jsonl_records,
    tokenize_dataset,
)
from illada_lightning.data.tokenizer import ROLE_TOKENS

log = logging.getLogger(__name__)


@dataclass
class SFTExamples:
    """Tokenised (prompt, response) pairs; a response does not include its terminal EOS."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)


# --- records -------------------------------------------------------------------------------------------


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLE_TOKENS:
            raise DataFileError(f"{where}: messages[{i}] must be an object with 'role' in "
                                f"{sorted(ROLE_TOKENS)} and a string 'content', got {m!r:.80}")
    if messages[-1]["role"] != "assistant":
        raise DataFileError(f"{where}: the last message must be the assistant's (the response to learn)")
    if not any(m["role"] == "user" for m in messages):
        raise DataFileError(f"{where}: the dialogue has no user message")


def check_record(record: dict, where: str) -> None:
    """A record must hold string `prompt` and `response`, or a valid `messages` list."""
    if "messages" in record:
        _check_messages(record["messages"], where)
        return
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            problem = "has no field" if key not in record else "has a non-string field"
            raise DataFileError(f"{where}: record {problem} {key!r}; expected 'prompt' and 'response' strings "
                                f"or a 'messages' list (keys: {sorted(record)})")


def record_to_pairs(record: dict, tokenizer, multi_turn_split: bool) -> list[tuple[str, str]]:
    """(prompt text, response text) pairs of a record; see the module doc for dialogues."""
    if "messages" not in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        messages = record["messages"]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]
    if not multi_turn_split:
        turns = turns[-1:]
    return [(tokenizer.format_chat(messages[:k], add_generation_prompt=True), messages[k]["content"]) for k in turns]


def read_sft_pairs(files: Sequence[str | Path], tokenizer, multi_turn_split: bool) -> list[tuple[str, str]]:
    pairs = []
    for path in files:
        for lineno, record in read_jsonl_records(path):
            check_record(record, f"{path}:{lineno}")
            pairs += record_to_pairs(record, tokenizer, multi_turn_split)
    return pairs


def load_sft_examples(
    files: Sequence[str | Path], tokenizer, *, multi_turn_split: bool, cache_dir: str | Path | None = ".cache/illada"
) -> SFTExamples:
    """Read, validate and tokenise instruction files once (cached like the pretraining corpus)."""
    paths = [check_data_file(f) for f in files]
    key = cache_key("sft", str(multi_turn_split), tokenizer.fingerprint(), *(file_hash(p) for p in paths))
    cache_file = Path(cache_dir) / f"sft-{key}.arrow" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        tokens = datasets.Dataset.from_file(str(cache_file))
    else:
        pairs = read_sft_pairs(paths, tokenizer, multi_turn_split)
        ds = datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})
        tokens = tokenize_dataset(ds, tokenizer, ["prompt", "response"], cache_file)
    return SFTExamples(column_to_arrays(tokens, "prompt_ids"), column_to_arrays(tokens, "response_ids"))


# --- whole_window (iLLaDA §2.2) ------------------------------------------------------------------------


def example_stream_documents(examples: SFTExamples, eos_id: int) -> list[np.ndarray]:
    """prompt + response + one terminal EOS per example, in order: the documents of the instruction stream."""
    eos = np.array([eos_id], dtype=np.int32)
    return [np.concatenate([p, r, eos]) for p, r in zip(examples.prompts, examples.responses)]


# --- response_only (LLaDA §2.3, B.1) -------------------------------------------------------------------


def truncate_example(prompt: np.ndarray, answer: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit prompt + answer (response + EOS) in `max_seq_len`: keep the prompt's end (the question and the
    assistant marker) but at most half the row when the answer needs more, and cut the answer's tail. A cut
    answer loses its EOS, so the model is never taught that a truncated answer is finished."""
    if prompt.size + answer.size <= max_seq_len:
        return prompt, answer
    keep_prompt = min(prompt.size, max(max_seq_len - answer.size, max_seq_len // 2))
    prompt = prompt[prompt.size - keep_prompt :]
    return prompt, answer[: max_seq_len - keep_prompt]


def response_only_rows(
    examples: SFTExamples, max_seq_len: int, eos_id: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per example: the row tokens (prompt + response + EOS, truncated) and the prompt length."""
    eos = np.array([eos_id], dtype=np.int32)
    rows, prompt_lens, n_long = [], [], 0
    for p, r in zip(examples.prompts, examples.responses):
        answer = np.concatenate([r, eos])
        if p.size + answer.size > max_seq_len:
            n_long += 1
            p, answer = truncate_example(p, answer, max_seq_len)
        rows.append(np.concatenate([p, answer]))
        prompt_lens.append(p.size)
    if examples and n_long == len(examples):
        raise ValueError(f"every one of the {n_long} SFT examples is longer than max_seq_len={max_seq_len} "
                         f"(prompt + response + EOS): raise sft.max_seq_len / model.max_seq_len")
    if n_long:
        log.warning("%d of %d SFT examples are longer than max_seq_len=%d: truncated", n_long, len(examples),
                    max_seq_len)
    return rows, np.asarray(prompt_lens, dtype=np.int64)


def collate_response_only(rows: Sequence[np.ndarray], prompt_lens: Sequence[int], eos_id: int) -> dict:
    """One example per row, EOS-padded to the batch's longest; loss_mask False on the prompt only."""
    row_len = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), row_len), eos_id, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
    loss_mask = torch.arange(row_len)[None, :] >= torch.as_tensor(np.asarray(prompt_lens), dtype=torch.long)[:, None]
    cu_seqlens = torch.arange(0, (len(rows) + 1) * row_len, row_len, dtype=torch.int32)
    return {"input_ids": input_ids, "cu_seqlens": cu_seqlens, "max_seqlen": int(row_len), "loss_mask": loss_mask}
