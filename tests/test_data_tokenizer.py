"""Tokenizer: fixed special ids, round trip, chat template, save/load, compatibility with a model config."""

import json

import pytest

from illada_lightning.data.config import TokenizerConfig
from illada_lightning.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    build_tokenizer,
    check_tokenizer_compatible,
    train_tokenizer,
    train_tokenizer_from_iterator,
)
from illada_lightning.model.config import EOS_ID, MASK_ID, PAD_ID, get_preset

TEXT = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "What is 17 + 25? Tom has 3 apples and buys 5 more. How many apples does Tom have?",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer_from_iterator(TEXT, vocab_size=400)


def test_special_tokens_at_fixed_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(9))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (PAD_ID, 1, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    assert tok.token_to_id("<|user|>") == 4 and tok.token_to_id("<|assistant|>") == 5
    assert 300 <= tok.vocab_size <= 400


@pytest.mark.parametrize("text", ["Speak, speak.", "What is 17 + 25?\n42", "café ünïcode ✓ 東京", "  two  spaces "])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(i >= 9 for i in ids)  # plain text never produces a special id
    assert tok.decode(ids) == text


def test_special_strings_encode_to_their_ids(tok):
    ids = tok.encode("<|user|>\nhi<|eos|>")
    assert ids[0] == 4 and ids[-1] == 2
    assert tok.decode(ids) == "\nhi"  # specials skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == "<|user|>\nhi<|eos|>"
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_id


def test_chat_template_prompt_then_response(tok):
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.format_chat(user, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"
    full = tok.format_chat(user + [{"role": "assistant", "content": "5"}], add_generation_prompt=False)
    assert full.startswith(prompt) and full[len(prompt):] == "5\n"
    # separate tokenisation of prompt and response equals joint tokenisation (what training relies on)
    assert tok.encode(prompt) + tok.encode("5") == tok.encode(prompt + "5")
    system = tok.format_chat([{"role": "system", "content": "Be brief."}] + user, True)
    assert system.startswith("<|system|>\nBe brief.\n<|user|>")
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.format_chat([{"role": "bot", "content": "x"}], True)


def test_save_load_identical(tok, tmp_path):
    path = tok.save(tmp_path / "run")
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.load(tmp_path / "run")
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode("Speak, speak. 17 + 25") == tok.encode("Speak, speak. 17 + 25")
    assert Tokenizer.load(path).vocab_size == tok.vocab_size


def test_load_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        Tokenizer.load(bad)


def test_load_rejects_tokenizer_without_our_special_ids(tok, tmp_path):
    data = json.loads(tok.backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mask|>"]
    data["model"]["vocab"].pop("<|mask|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"'<\|mask\|>' at id None, expected id 3"):
        Tokenizer.load(tmp_path)


def test_compatible_with_tiny_preset(tok):
    check_tokenizer_compatible(tok, get_preset("tiny"))  # no error


def test_incompatible_vocab_and_ids(tok):
    with pytest.raises(ValueError, match=r"vocabulary \(\d+\) is larger than model.vocab_size \(256\)"):
        check_tokenizer_compatible(tok, get_preset("tiny", vocab_size=256))
    with pytest.raises(ValueError, match="mask id is 3 but model.mask_token_id is 7"):
        check_tokenizer_compatible(tok, get_preset("tiny", mask_token_id=7))
    with pytest.raises(ValueError, match="eos id is 2 but model.eos_token_id is 126081"):
        check_tokenizer_compatible(tok, get_preset("llada_8b"))


def test_train_from_files_and_build_cache(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXT))
    direct = train_tokenizer([str(corpus)], 350)
    cache = tmp_path / "cache"
    built = build_tokenizer(TokenizerConfig(vocab_size=350), [str(corpus)], cache_dir=cache)
    assert built.fingerprint() == direct.fingerprint()  # training is deterministic
    assert len(list(cache.glob("tokenizer-*/tokenizer.json"))) == 1
    again = build_tokenizer(TokenizerConfig(vocab_size=350), [str(corpus)], cache_dir=cache)
    assert again.fingerprint() == built.fingerprint()
    saved = built.save(tmp_path / "saved")
    assert build_tokenizer(TokenizerConfig(path=str(saved)), []).fingerprint() == built.fingerprint()
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=10).validate()
