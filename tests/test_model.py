"""The mask predictor: presets, shapes, document isolation, RoPE restart, GQA, backends."""

import json
import subprocess
import sys

import pytest
import torch

from illada_lightning import build_model, count_parameters
from illada_lightning.model.attention import (
    check_cu_seqlens,
    make_layout,
    reference_attention,
    resolve_backend,
)
from illada_lightning.model.config import PRESETS, ModelConfig, get_preset
from illada_lightning.model.rope import apply_rope, rope_cos_sin

SMALL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=64)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("tiny", **{**SMALL, **kw}).eval()


@pytest.mark.parametrize(
    "preset,total,non_emb",
    [("illada_8b", 7.62e9, 6.98e9), ("llada_8b", 8.02e9, 6.98e9)],
)
def test_8b_parameter_counts_match_illada_table1(preset, total, non_emb):
    counts = count_parameters(build_model(preset, device="meta"))
    assert round(counts["total_params"] / 1e9, 2) == round(total / 1e9, 2)
    assert round(counts["non_embedding_params"] / 1e9, 2) == round(non_emb / 1e9, 2)


def test_table1_architecture_fields():
    il, ll = PRESETS["illada_8b"], PRESETS["llada_8b"]
    assert (il.n_layers, il.d_model, il.n_heads, il.n_kv_heads, il.ffn_dim, il.vocab_size, il.max_seq_len) == (
        32, 4096, 32, 8, 14336, 155136, 8192)
    assert (ll.n_layers, ll.d_model, ll.n_heads, ll.n_kv_heads, ll.ffn_dim, ll.vocab_size, ll.max_seq_len) == (
        32, 4096, 32, 32, 12288, 126464, 4096)
    assert il.tie_embeddings and not ll.tie_embeddings


def test_small_presets_sizes():
    tiny_p = count_parameters(build_model("tiny", device="meta"))["total_params"]
    small_p = count_parameters(build_model("small", device="meta"))["total_params"]
    base_p = count_parameters(build_model("base", device="meta"))["total_params"]
    assert 1e6 < tiny_p < 5e6 and 20e6 < small_p < 32e6 and 120e6 < base_p < 180e6


def test_inspect_cli_prints_json_without_allocating():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.inspect", "model=illada_8b"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    assert round(info["total_params"] / 1e9, 2) == 7.62
    assert info["non_embedding_params"] > 6.97e9 and info["device"] == "meta"


def test_inspect_cli_rejects_unknown_preset():
    out = subprocess.run([sys.executable, "-m", "experiments.inspect", "model=huge"], capture_output=True, text=True)
    assert out.returncode != 0 and "huge" in out.stderr and "illada_8b" in out.stderr
    assert "Traceback" not in out.stderr


def test_unpacked_forward_shape_and_no_bias():
    model = tiny()
    logits = model(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_tied_vs_untied_head():
    assert tiny().lm_head is None
    untied = tiny(tie_embeddings=False)
    assert untied.output_weight is untied.lm_head.weight


def test_bidirectional_later_tokens_change_earlier_outputs():
    model = tiny()
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])  # no causal mask


def test_document_isolation_bit_for_bit():
    model = tiny()
    x = torch.randint(0, 97, (1, 20))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    y = x.clone()
    y[0, :7] = torch.randint(0, 97, (7,))  # change document A only
    out_x, out_y = model(x, cu_seqlens=cu), model(y, cu_seqlens=cu)
    assert torch.equal(out_x[0, 7:], out_y[0, 7:])
    assert not torch.equal(out_x[0, :7], out_y[0, :7])


def test_packed_equals_each_document_alone():
    model = tiny()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    packed = model(torch.cat(docs), cu_seqlens=cu)
    alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_rope_positions_restart_per_document():
    layout = make_layout(2, 6, torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32), None, "cpu")
    assert layout.position_ids.tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    assert layout.max_seqlen == 4


def test_rope_is_relative():
    # <rope(q, i), rope(k, j)> depends only on i - j.
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(i, j):
        cq, sq = rope_cos_sin(torch.tensor([[i]]), 8, 10_000.0)
        ck, sk = rope_cos_sin(torch.tensor([[j]]), 8, 10_000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(dot(5, 2), dot(13, 10))
    assert not torch.allclose(dot(5, 2), dot(5, 3))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa = tiny(n_heads=4, n_kv_heads=2)
    mha = tiny(n_heads=4, n_kv_heads=4)
    sd = gqa.state_dict()
    hd, d = 16, 64
    for i in range(2):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([4 * hd, 2 * hd, 2 * hd])
        rep = lambda t: t.view(2, hd, d).repeat_interleave(2, dim=0).reshape(4 * hd, d)  # noqa: E731
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 10))
    cu = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)
    torch.testing.assert_close(gqa(x, cu_seqlens=cu), mha(x, cu_seqlens=cu), atol=1e-5, rtol=1e-5)


def test_sdpa_backend_matches_per_document_reference():
    from illada_lightning.model.attention import attention

    torch.manual_seed(2)
    B, L, H, Hkv, D = 2, 12, 4, 2, 8
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    cu = torch.tensor([0, 3, 12, 17, 24], dtype=torch.int32)
    layout = make_layout(B, L, cu, None, "cpu")
    out = attention(q, k, v, layout, "sdpa").reshape(B * L, H, D)
    ref = reference_attention(q.reshape(B * L, H, D), k.reshape(B * L, Hkv, D), v.reshape(B * L, Hkv, D), cu)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_backend_errors_are_clear():
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("varlen", torch.device("cpu"), torch.bfloat16)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash-attn"):
            resolve_backend("flash_attn", torch.device("cpu"), torch.bfloat16)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="row boundary"):
        check_cu_seqlens(torch.tensor([0, 3, 8]), 2, 4)
    with pytest.raises(ValueError, match="increasing"):
        check_cu_seqlens(torch.tensor([0, 4, 4, 8]), 2, 4)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_preset("tiny", n_kv_heads=4)
    with pytest.raises(ValueError, match="collides"):
        ModelConfig(mask_token_id=2).validate()
    with pytest.raises(KeyError, match="available presets"):
        get_preset("nope")
    with pytest.raises(TypeError, match="unknown model config"):
        build_model("tiny", layers=3)


@pytest.mark.parametrize("preset", ["tiny", "1b", "llada_8b", "illada_8b"])
def test_analytic_non_embedding_params_match_the_model(preset):
    from illada_lightning.model.flops import non_embedding_params

    model = build_model(preset, device="meta")
    assert non_embedding_params(model.config) == count_parameters(model)["non_embedding_params"]


def test_training_flops_known_values():
    from illada_lightning.model.flops import non_embedding_params, training_flops

    cfg = get_preset("tiny")
    n = non_embedding_params(cfg)
    assert training_flops(cfg, [10], 0) == 6 * n * 10 + 12 * cfg.n_layers * cfg.d_model * 100
    # packing two documents costs less attention than one document of the same total length
    assert training_flops(cfg, [5, 5], 4) < training_flops(cfg, [10], 4)
    assert training_flops(cfg, [10], 4) - training_flops(cfg, [10], 0) == 6 * cfg.vocab_size * cfg.d_model * 4
    # What training counts every step, on device tensors: the same number from a packed batch's cu_seqlens.
    from illada_lightning.model.flops import flops_from_counts, measured_gemm_tflops, squared_segment_lengths

    cu = torch.tensor([0, 3, 10, 16], dtype=torch.int32)  # documents of 3, 7 and 6 tokens in two rows of 8
    sq = squared_segment_lengths(torch.zeros(2, 8, dtype=torch.long), cu)
    on_device = flops_from_counts(cfg, torch.tensor(16.0, dtype=torch.float64), sq, torch.tensor(5.0, dtype=torch.float64))
    assert on_device.dtype == torch.float64 and on_device.item() == training_flops(cfg, [3, 7, 6], 5)
    assert squared_segment_lengths(torch.zeros(2, 8, dtype=torch.long), None).item() == 2 * 64
    assert measured_gemm_tflops("cpu") is None  # MFU is a GPU number


def test_sdpa_per_document_path_matches_reference_on_a_long_flat_row():
    from illada_lightning.model.attention import _sdpa_per_document, attention

    torch.manual_seed(3)
    lengths = [5, 1, 9, 3, 7, 2]
    T, H, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, T, H, D), torch.randn(1, T, Hkv, D), torch.randn(1, T, Hkv, D)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    layout = make_layout(1, T, cu, None, "cpu")
    ref = reference_attention(q[0], k[0], v[0], cu)
    torch.testing.assert_close(_sdpa_per_document(q, k, v, layout)[0].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, layout, "sdpa")[0].double(), ref, atol=1e-5, rtol=1e-5)
