"""Model configuration and named presets (iLLaDA Table 1, LLaDA Table 5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..options import reject_unknown

ATTENTION_BACKENDS = ("auto", "varlen", "flash_attn", "sdpa")

# Special-token ids shared by every tokenizer this project trains (see data/tokenizer.py).
# They sit at the start of the vocabulary so that a model config can name them before a
# tokenizer exists; `check_tokenizer_compatible` verifies the pairing at run time.
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3


@dataclass
class ModelConfig:
    """The mask predictor: a bidirectional Transformer (RMSNorm, SwiGLU, RoPE, no biases, GQA)."""

    name: str = "tiny"
    n_layers: int = 4
    d_model: int = 192
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_dim: int = 512
    vocab_size: int = 4096
    max_seq_len: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_backend: str = "auto"
    mask_token_id: int = MASK_ID
    eos_token_id: int = EOS_ID
    pad_token_id: int = PAD_ID

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> ModelConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"model config '{self.name}': {msg}")

        for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            need(getattr(self, f) > 0, f"{f} must be positive, got {getattr(self, f)}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} (grouped-query attention)",
        )
        need(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}",
        )
        specials = {"mask_token_id": self.mask_token_id, "eos_token_id": self.eos_token_id,
                    "pad_token_id": self.pad_token_id}
        for key, value in specials.items():
            need(0 <= value < self.vocab_size, f"{key}={value} is outside the vocabulary [0, {self.vocab_size})")
        need(
            self.mask_token_id not in (self.eos_token_id, self.pad_token_id),
            f"mask_token_id={self.mask_token_id} collides with another special token "
            f"(eos={self.eos_token_id}, pad={self.pad_token_id})",
        )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# Presets. tiny/small/base/1b are this project's; the 8B ones are exactly iLLaDA Table 1.
PRESETS: dict[str, ModelConfig] = {
    # CPU smoke runs: ~2.4M parameters, trains in minutes on 2 cores.
    "tiny": ModelConfig(),
    # ~25M (24M non-embedding): the size for a one-GPU ten-minute run.
    "small": ModelConfig(
        name="small", n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, ffn_dim=1408,
        vocab_size=8192, max_seq_len=1024,
    ),
    # ~150M.
    "base": ModelConfig(
        name="base", n_layers=12, d_model=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816,
        vocab_size=16384, max_seq_len=2048,
    ),
    # LLaDA 1B's depth and width (LLaDA Table 5) with iLLaDA's choices: 128-wide heads, GQA, tied
    # embeddings; FFN rounded to a multiple of 128 for tensor-core friendly GEMMs.
    "1b": ModelConfig(
        name="1b", n_layers=22, d_model=2048, n_heads=16, n_kv_heads=4, ffn_dim=5632,
        vocab_size=126_464, max_seq_len=8192, rope_theta=500_000.0,
    ),
    # LLaDA 8B: multi-head attention, untied, 126,464-token vocabulary (iLLaDA Table 1, right).
    "llada_8b": ModelConfig(
        name="llada_8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, ffn_dim=12_288,
        vocab_size=126_464, max_seq_len=4096, tie_embeddings=False, rope_theta=500_000.0,
        mask_token_id=126_336, eos_token_id=126_081, pad_token_id=126_081,  # LLaDA pads with EOS
    ),
    # iLLaDA 8B: GQA with 8 KV heads, tied, 155,136-token vocabulary (iLLaDA Table 1, left).
    "illada_8b": ModelConfig(
        name="illada_8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_dim=14_336,
        vocab_size=155_136, max_seq_len=8192, tie_embeddings=True, rope_theta=500_000.0,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return a copy of a named preset, with field overrides applied and validated."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available presets: {', '.join(PRESETS)}")
    return with_overrides(PRESETS[name], **overrides)


def with_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
    """A validated copy of `cfg` with field overrides; an unknown field is a TypeError naming it."""
    reject_unknown(ModelConfig, overrides, "model config", "key")
    return replace(cfg, **overrides).validate()
