"""Released LLaDA checkpoints in and out (interop/llada_hf.py): round trip, parity with the published layout
computed by an independent forward written here from the released modelling code's equations, and the errors."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import illada_lightning as il
from illada_lightning import build_model
from illada_lightning.checkpoint import CheckpointError, load_init_weights
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.interop.llada_hf import export_hf_checkpoint, load_hf_checkpoint
from illada_lightning.model.config import get_preset

TEXT = "The Sun heats water and it evaporates. Janet sells ducks at the market every day. " * 20
P = "model.transformer."


def published_config(**arch) -> dict:
    """The key set of the released LLaDA-8B config.json, with a tiny architecture."""
    conf = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": 96, "eos_token_id": 90, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 94, "max_sequence_length": 64, "mlp_hidden_size": 96,
        "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4,
        "n_layers": 2, "pad_token_id": 90, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
        "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 96, "weight_tying": False,
    }
    conf.update(arch)
    return conf


def published_weights(conf: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the documented names and shapes (norm weights random too, to catch misplacement)."""
    g = torch.Generator().manual_seed(seed)
    d, hs = conf["d_model"], conf["d_model"] // conf["n_heads"]
    kv, f, rows = conf["n_kv_heads"] * hs, conf["mlp_hidden_size"], conf["embedding_size"]

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    w = {P + "wte.weight": rand(rows, d, scale=0.2), P + "ln_f.weight": 1 + rand(d)}
    if not conf["weight_tying"]:
        w[P + "ff_out.weight"] = rand(rows, d)
    for i in range(conf["n_layers"]):
        b = f"{P}blocks.{i}."
        w.update({b + "attn_norm.weight": 1 + rand(d), b + "q_proj.weight": rand(d, d), b + "k_proj.weight": rand(kv, d),
                  b + "v_proj.weight": rand(kv, d), b + "attn_out.weight": rand(d, d), b + "ff_norm.weight": 1 + rand(d),
                  b + "ff_proj.weight": rand(f, d), b + "up_proj.weight": rand(f, d), b + "ff_out.weight": rand(d, f)})
    return w


def write_published(directory, conf: dict, weights: dict, n_shards: int = 2) -> None:
    """A checkpoint directory as the released ones are laid out: config.json, shards and their index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(conf))
    keys = list(weights)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[s::n_shards]
        save_file({k: weights[k].contiguous() for k in part}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def reference_forward(w: dict, conf: dict, ids: torch.Tensor) -> torch.Tensor:
    """The released LLaDALlamaBlock model, from its equations: pre-RMSNorm (float32 variance), q/k/v, half-split
    RoPE (sin/cos of cat(freqs, freqs), rotate_half = cat(-x2, x1)), KV heads repeat_interleave'd, unmasked
    softmax(q k^T / sqrt(hs)) v, attn_out; ff_out(silu(ff_proj(h)) * up_proj(h)); ln_f; ff_out or wte head."""
    d, nh, nkv = conf["d_model"], conf["n_heads"], conf["n_kv_heads"]
    hs, eps = d // nh, conf["rms_norm_eps"]
    B, T = ids.shape

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / (conf["rope_theta"] ** (torch.arange(0, hs, 2).float() / hs))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    sin, cos = torch.cat([freqs, freqs], -1).sin(), torch.cat([freqs, freqs], -1).cos()

    def rope(t):
        t1, t2 = t[..., : hs // 2], t[..., hs // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = w[P + "wte.weight"][ids]
    for i in range(conf["n_layers"]):
        def lin(name, inp, i=i):
            return inp @ w[f"{P}blocks.{i}.{name}.weight"].T

        h = rms(x, w[f"{P}blocks.{i}.attn_norm.weight"])
        q = lin("q_proj", h).view(B, T, nh, hs).transpose(1, 2)
        k = lin("k_proj", h).view(B, T, nkv, hs).transpose(1, 2)
        v = lin("v_proj", h).view(B, T, nkv, hs).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1) @ v
        x = x + lin("attn_out", att.transpose(1, 2).reshape(B, T, d))
        h = rms(x, w[f"{P}blocks.{i}.ff_norm.weight"])
        x = x + lin("ff_out", F.silu(lin("ff_proj", h)) * lin("up_proj", h))
    x = rms(x, w[P + "ln_f.weight"])
    head = w[P + "wte.weight"] if conf["weight_tying"] else w[P + "ff_out.weight"]
    return x @ head.T


VARIANTS = {
    "llada_mha_untied": {},
    "illada_gqa_tied": {"n_kv_heads": 2, "weight_tying": True, "embedding_size": 128, "vocab_size": 100,
                        "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_published_layout_loads_with_the_released_models_logits(tmp_path, variant):
    conf = published_config(**VARIANTS[variant])
    weights = published_weights(conf)
    write_published(tmp_path / "ckpt", conf, weights)
    model, tokenizer = il.load_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None  # no tokenizer.json in this directory
    cfg = model.config
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.vocab_size) == (
        conf["n_kv_heads"], conf["weight_tying"], conf["embedding_size"])
    assert cfg.norm_eps == conf["rms_norm_eps"] and cfg.rope_theta == conf["rope_theta"] and cfg.mask_token_id == 94
    ids = torch.randint(0, conf["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), reference_forward(weights, conf, ids)
    assert ours.shape == (2, 24, conf["embedding_size"])
    assert (ours - ref).abs().max().item() < 1e-5
    # Packed input: two documents in one row give each document's own logits (positions restart).
    with torch.no_grad():
        packed = model(ids.reshape(1, -1), cu_seqlens=torch.tensor([0, 24, 48]), max_seqlen=24)
    assert (packed[0, 24:] - ref[1]).abs().max().item() < 1e-5


def test_llada_8b_config_maps_onto_the_preset(tmp_path):
    from illada_lightning.interop.llada_config import model_config_from_llada

    conf = published_config(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                            vocab_size=126464, embedding_size=126464, eos_token_id=126081, pad_token_id=126081,
                            mask_token_id=126336, max_sequence_length=4096)
    cfg = model_config_from_llada(conf)
    assert cfg.name == "llada_8b"
    assert cfg == get_preset("llada_8b")


def llada_like_tokenizer() -> RustTokenizer:
    """A small BPE whose special tokens sit at the end of the vocabulary, as in the released tokenizer."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|mdm_mask|>"])
    return tok


LLAMA3_STYLE_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def write_llada_like(directory, **arch):
    tok = llada_like_tokenizer()
    size = tok.get_vocab_size()
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mdm_mask|>")
    conf = published_config(vocab_size=size, embedding_size=384, eos_token_id=eos, pad_token_id=eos,
                            mask_token_id=mask, **arch)
    write_published(directory, conf, published_weights(conf))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "chat_template": LLAMA3_STYLE_TEMPLATE}))
    return tok, conf


def test_tokenizer_special_ids_and_chat_template_come_from_the_checkpoint(tmp_path):
    tok, conf = write_llada_like(tmp_path / "ckpt")
    _, tokenizer = il.load_checkpoint(tmp_path / "ckpt")
    assert tokenizer.mask_id == conf["mask_token_id"] == tok.token_to_id("<|mdm_mask|>")
    assert tokenizer.eos_id == tokenizer.pad_id == tok.token_to_id("<|endoftext|>")
    assert tokenizer.bos_id == tok.token_to_id("<|startoftext|>")
    assert tokenizer.mask_id in tokenizer.special_ids
    text = tokenizer.format_chat([{"role": "user", "content": " Who sells ducks? "}], add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWho sells ducks?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and tok.token_to_id("<|eot_id|>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("user")


@pytest.fixture(scope="module")
def trained_tiny():
    torch.manual_seed(0)
    tokenizer = train_tokenizer_from_iterator([TEXT], 320)
    model = build_model("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=384,
                        max_seq_len=64)
    return model.eval(), tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits_and_tokenizer(tmp_path, trained_tiny, tied):
    model, tokenizer = trained_tiny
    if not tied:
        model = build_model("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=384,
                            max_seq_len=64, tie_embeddings=False).eval()
    out = export_hf_checkpoint(model, tokenizer, tmp_path / "hf", dtype="float32", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert (P + "ff_out.weight" in index["weight_map"]) is not tied
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in model.parameters())
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LLaDAModelLM"] and conf["block_type"] == "llama"
    loaded, tok = il.load_checkpoint(out)
    ids = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert dataclasses.replace(loaded.config, name=model.config.name) == model.config  # name: "hf"
    assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.bos_id) == (tokenizer.mask_id, tokenizer.eos_id,
                                                                 tokenizer.pad_id, tokenizer.bos_id)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who sells ducks?"}]
    assert tok.format_chat(chat, True) == tokenizer.format_chat(chat, True)
    assert tok.encode(TEXT[:200]) == tokenizer.encode(TEXT[:200])


def test_bf16_export_holds_the_bf16_rounded_weights(tmp_path, trained_tiny):
    model, tokenizer = trained_tiny
    out = export_hf_checkpoint(model, tokenizer, tmp_path / "hf")  # default dtype: bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_hf_checkpoint(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16)), name


def test_export_refuses_a_non_empty_directory_and_keeps_it(tmp_path, trained_tiny):
    model, tokenizer = trained_tiny
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_hf_checkpoint(model, tokenizer, tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "keep me"


def test_init_from_accepts_a_checkpoint_directory(tmp_path):
    conf = published_config()
    weights = published_weights(conf)
    write_published(tmp_path / "ckpt", conf, weights)
    reference, _ = il.load_checkpoint(tmp_path / "ckpt")
    target = build_model(reference.config)
    tokenizer_json, resolved = load_init_weights(target, tmp_path / "ckpt", reference.config)
    assert tokenizer_json is None and resolved == tmp_path / "ckpt"
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(target.eval()(ids), reference(ids))


# ----------------------------------------------------------------------------- errors


def test_missing_shard_names_the_file_and_a_key(tmp_path):
    conf = published_config()
    write_published(tmp_path / "ckpt", conf, published_weights(conf))
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard file is missing "
                                              r"\(it holds 'model\.transformer\.[a-z_.0-9]+weight'"):
        il.load_checkpoint(tmp_path / "ckpt")


def test_unknown_architecture_key_is_refused_by_name(tmp_path):
    conf = published_config(use_qk_clamp=True)
    write_published(tmp_path / "ckpt", conf, published_weights(conf))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture key\(s\) \['use_qk_clamp'\]"):
        il.load_checkpoint(tmp_path / "ckpt")
    conf = published_config(include_bias=True)
    write_published(tmp_path / "ckpt2", conf, published_weights(conf))
    with pytest.raises(CheckpointError, match=r"config\.json: include_bias=True is not supported"):
        il.load_checkpoint(tmp_path / "ckpt2")


def test_tokenizer_larger_than_the_weights_is_refused(tmp_path):
    tok, _ = write_llada_like(tmp_path / "ckpt")
    conf = published_config(vocab_size=100, embedding_size=100, eos_token_id=90, pad_token_id=90, mask_token_id=94)
    write_published(tmp_path / "small", conf, published_weights(conf))
    tok.save(str(tmp_path / "small" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: vocabulary of 306 tokens does not fit the "
                                              r"weights' 100 embedding rows"):
        il.load_checkpoint(tmp_path / "small")


def test_mask_id_outside_the_vocabulary_is_refused(tmp_path):
    conf = published_config(mask_token_id=96)
    write_published(tmp_path / "ckpt", conf, published_weights(conf))
    with pytest.raises(CheckpointError, match=r"config\.json: mask_token_id=96 is outside the vocabulary \[0, 96\)"):
        il.load_checkpoint(tmp_path / "ckpt")
    # inside the weights but beyond the tokenizer's tokens
    write_llada_like(tmp_path / "tok")
    conf = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**conf, "mask_token_id": 350}))
    with pytest.raises(CheckpointError, match=r"config\.json: mask_token_id=350 is outside the vocabulary of "
                                              r".*tokenizer\.json \(306 tokens\)"):
        il.load_checkpoint(tmp_path / "tok")


def test_mis_shaped_weight_names_file_and_key(tmp_path):
    conf = published_config()
    weights = published_weights(conf)
    weights[P + "blocks.1.k_proj.weight"] = weights[P + "blocks.1.k_proj.weight"][:32]
    write_published(tmp_path / "ckpt", conf, weights)
    with pytest.raises(CheckpointError, match=r"safetensors: 'model\.transformer\.blocks\.1\.k_proj\.weight' has "
                                              r"shape \(32, 64\), config\.json implies \(64, 64\)"):
        il.load_checkpoint(tmp_path / "ckpt")


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    return {"rel_norm": float((a - b).norm() / b.norm()), "max_abs": float(diff.max()),
            "frac_above_0.1": float((diff > 0.1).double().mean()), "identical": bool(torch.equal(a, b))}


def bf16_parity(tmp_path, device: str = "cuda") -> dict:
    """Is a bf16-vs-float32 logit difference bf16 arithmetic or the loading path? (the device machine's diagnostic)

    The same weights (bf16 values) three ways: loaded from a bf16 checkpoint straight onto the GPU in bf16
    (`loaded`), loaded from a float32 checkpoint and cast to bf16 on the GPU (`cast`: same weights, same kernels),
    and the float32 reference forward on the CPU (`ref`); plus the float32 model on the GPU (TF32 off). A loading
    defect makes loaded vs cast O(1); bf16 arithmetic makes loaded vs ref and cast vs ref alike, ~1e-3..1e-2.
    `device="cpu"` runs the same comparison on the CPU (a smoke run of this function).
    """
    conf = published_config(d_model=256, n_heads=4, n_kv_heads=2, mlp_hidden_size=768, embedding_size=4096,
                            vocab_size=4096, weight_tying=True)
    weights = {k: v.to(torch.bfloat16) for k, v in published_weights(conf).items()}
    write_published(tmp_path / "bf16", conf, weights)
    write_published(tmp_path / "fp32", conf, {k: v.float() for k, v in weights.items()})
    gpu = device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loaded, _ = il.load_checkpoint(tmp_path / "bf16", device="cuda")
        peak = torch.cuda.max_memory_allocated() - base
    else:
        loaded, _ = load_hf_checkpoint(tmp_path / "bf16", device="cpu", dtype=torch.bfloat16)
        peak = None
    fp32, _ = il.load_checkpoint(tmp_path / "fp32")  # float32 on the CPU
    cast = build_model(fp32.config, device="meta")
    cast.load_state_dict({k: v.to(device, torch.bfloat16) for k, v in fp32.state_dict().items()}, assign=True)
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = reference_forward({k: v.float() for k, v in weights.items()}, conf, ids)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            x = ids.to(device)
            out = {"loaded": loaded(x).float().cpu(), "cast": cast.eval()(x).float().cpu(),
                   "fp32_gpu": fp32.to(device)(x).float().cpu()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    params = list(loaded.parameters())
    return {
        "dtypes": sorted({str(p.dtype) for p in params}), "on_device": all(p.device.type == device for p in params),
        "model_bytes": sum(p.numel() * p.element_size() for p in params), "load_peak_bytes": peak,
        "logit_std": float(ref.std()), "logit_max_abs": float(ref.abs().max()),
        "loaded_vs_cast": _compare(out["loaded"], out["cast"]), "loaded_vs_ref": _compare(out["loaded"], ref),
        "cast_vs_ref": _compare(out["cast"], ref), "fp32_gpu_vs_ref": _compare(out["fp32_gpu"], ref),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
    }


def test_bf16_parity_diagnostic_runs_on_cpu(tmp_path):
    """The device diagnostic's comparison on the CPU: bf16 weights loaded = the same weights cast, bitwise."""
    stats = bf16_parity(tmp_path, device="cpu")
    assert stats["dtypes"] == ["torch.bfloat16"] and stats["loaded_vs_cast"]["identical"]
    assert stats["fp32_gpu_vs_ref"]["rel_norm"] < 1e-5 and 1e-4 < stats["loaded_vs_ref"]["rel_norm"] < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_bf16_on_the_gpu_with_no_float32_copy(tmp_path):
    """bf16 weights load onto the GPU in bf16 without a float32 copy and compute what the same weights cast to
    bf16 compute; the float32 reference is matched to bf16 arithmetic's accuracy.

    The first version compared the largest element with the float32 reference (atol 0.1) and failed on an H100
    (0.33 on 0.6 % of the logits): with logits up to ~15 a bf16 logit alone is stored with a step of 0.06, and
    the attention logits amplify earlier rounding, so the largest element is the wrong measure. A loading defect
    (wrong tensor, transposed, misplaced norm) is O(1) in the relative norm against the cast model, which runs
    the same weights through the same kernels; bf16 arithmetic is 1e-3..1e-2 per operation against float32
    (relative norm), compounded here over two all-bf16 layers."""
    stats = bf16_parity(tmp_path)
    assert stats["dtypes"] == ["torch.bfloat16"] and stats["on_device"]
    # the model plus one fused q|k|v being assembled, never a float32 copy (which alone would be 2x)
    assert stats["load_peak_bytes"] < 1.3 * stats["model_bytes"]
    assert stats["fp32_gpu_vs_ref"]["rel_norm"] < 1e-4, stats  # the float32 model on the GPU is the reference
    assert stats["loaded_vs_cast"]["rel_norm"] < 5e-3, stats  # same weights, same kernels (usually identical)
    # bf16 arithmetic: 1e-3..1e-2 per operation; this all-bf16 model (bf16 residual stream, two layers) measures
    # 1.6e-2 on the CPU with the same weights (test_bf16_parity_diagnostic_runs_on_cpu)
    assert stats["loaded_vs_ref"]["rel_norm"] < 3e-2, stats
    # and no worse than the cast model's own bf16 error: the loading path adds nothing
    assert stats["loaded_vs_ref"]["rel_norm"] < 1.5 * stats["cast_vs_ref"]["rel_norm"] + 1e-3, stats
