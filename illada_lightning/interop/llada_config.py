"""LLaDA `config.json` (the OLMo-derived `LLaDAConfig` of the released checkpoints) <-> `ModelConfig`.

The released modelling code (`modeling_llada.py`, `LLaDALlamaBlock`) computes, per block,
`x + attn_out(attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))` with `n = RMSNorm(x)` (eps `rms_norm_eps`,
normalised in float32), then `h + ff_out(silu(ff_proj(m)) * up_proj(m))` with `m = RMSNorm(h)`; RoPE is the
half-split layout with `rope_theta`, attention is unmasked SDPA with scale 1/sqrt(head_dim) and KV heads repeated
by `repeat_interleave` (GQA); logits are `ln_f` then `ff_out` (or `wte` when `weight_tying`), `embedding_size`
columns wide. That is exactly our `MaskPredictor`, so the mapping is one-to-one; options that would change the
computation (biases, QK-norm, ALiBi, logit scaling, ...) are refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import replace

from ..model.config import PRESETS, ModelConfig
from . import HFCheckpointError

ARCHITECTURE = "LLaDAModelLM"
MODEL_TYPE = "llada"

# Keys whose value must be what our model computes; anything else is refused, naming the key.
REQUIRED = {
    "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False,
    "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": (False, None),
    "layer_norm_with_affine": True, "attention_layer_norm": False, "input_emb_norm": False,
    "scale_logits": False, "clip_qkv": None, "block_group_size": 1,
}
# Keys that map onto ModelConfig fields (read below).
MAPPED = {
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio", "multi_query_attention",
    "vocab_size", "embedding_size", "max_sequence_length", "weight_tying", "rope_theta", "rms_norm_eps",
    "mask_token_id", "eos_token_id", "pad_token_id", "init_std",
}
# Training-time or bookkeeping keys that do not change the forward pass at inference.
IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "use_cache", "_name_or_path",
    "attention_dropout", "residual_dropout", "embedding_dropout", "init_device", "init_fn", "init_cutoff_factor",
    "precision", "flash_attention", "alibi_bias_max", "attention_layer_norm_with_affine", "rope_full_precision",
    "bos_token_id", "tie_word_embeddings", "return_dict", "output_hidden_states",
}


def model_config_from_llada(raw: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a LLaDA `config.json` dict; unknown or unsupported architecture keys are errors."""
    unknown = sorted(set(raw) - set(REQUIRED) - MAPPED - IGNORED)
    if unknown:
        raise HFCheckpointError(f"{where}: unknown architecture key(s) {unknown}: this converter does not know "
                                "how they change the model (supported: the LLaDA/OLMo 'llama' block)")
    for key, allowed in REQUIRED.items():
        value = raw.get(key, allowed[0] if isinstance(allowed, tuple) else allowed)
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise HFCheckpointError(f"{where}: {key}={value!r} is not supported (need {allowed!r})")
    for key in ("d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id", "eos_token_id"):
        if raw.get(key) is None:
            raise HFCheckpointError(f"{where}: required key {key!r} is missing")
    d_model, n_heads = int(raw["d_model"]), int(raw["n_heads"])
    n_kv = 1 if raw.get("multi_query_attention") else int(raw.get("n_kv_heads") or n_heads)
    ffn = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * d_model
    # Our vocab_size is the embedding's row count: the released code sizes wte and the head by
    # embedding_size (padding rows beyond the tokenizer's vocab_size never win as targets).
    rows = int(raw.get("embedding_size") or raw["vocab_size"])
    if rows < int(raw["vocab_size"]):
        raise HFCheckpointError(f"{where}: embedding_size={rows} is smaller than vocab_size={raw['vocab_size']}")
    mask_id = int(raw["mask_token_id"])
    if not 0 <= mask_id < rows:
        raise HFCheckpointError(f"{where}: mask_token_id={mask_id} is outside the vocabulary [0, {rows})")
    eos = int(raw["eos_token_id"])
    pad = int(raw["pad_token_id"]) if raw.get("pad_token_id") is not None else eos  # LLaDA pads with EOS
    cfg = ModelConfig(
        name="hf", n_layers=int(raw["n_layers"]), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
        ffn_dim=int(ffn), vocab_size=rows, max_seq_len=int(raw.get("max_sequence_length") or 4096),
        tie_embeddings=bool(raw.get("weight_tying", False)), rope_theta=float(raw.get("rope_theta", 10_000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)), init_std=float(raw.get("init_std", 0.02)),
        mask_token_id=mask_id, eos_token_id=eos, pad_token_id=pad,
    )
    try:
        return replace(cfg, name=matching_preset(cfg) or "hf").validate()
    except ValueError as exc:
        raise HFCheckpointError(f"{where}: {exc}") from None


def matching_preset(cfg: ModelConfig) -> str | None:
    """The name of the preset with the same architecture (e.g. `llada_8b`), if any."""
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings")
    for name, preset in PRESETS.items():
        if all(getattr(preset, k) == getattr(cfg, k) for k in keys):
            return name
    return None


def llada_config_from_model(cfg: ModelConfig, vocab_size: int | None = None, dtype: str = "float32") -> dict:
    """A complete LLaDA `config.json` for `cfg` (every key the released `LLaDAConfig` reads).

    `vocab_size` is the tokenizer's (<= the embedding rows, which go to `embedding_size`)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers,
        "mlp_hidden_size": cfg.ffn_dim, "mlp_ratio": max(1, cfg.ffn_dim // cfg.d_model),
        "multi_query_attention": None, "vocab_size": vocab_size or cfg.vocab_size, "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_seq_len, "weight_tying": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "init_std": cfg.init_std, "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        **{k: (v[0] if isinstance(v, tuple) else v) for k, v in REQUIRED.items()},
        "rope_full_precision": True, "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "attention_layer_norm_with_affine": True, "alibi_bias_max": 8.0, "flash_attention": False,
        "init_device": "meta", "init_fn": "normal", "init_cutoff_factor": None, "precision": "amp_bf16",
        "torch_dtype": dtype, "use_cache": False,
    }
