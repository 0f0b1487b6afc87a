"""Attention backends agree with the per-document reference on the GPU (forward and gradients, bf16).

Run on the device machine: `python -m pytest tests/test_gpu_backends.py -q`.
"""

import pytest
import torch

from illada_lightning import build_model
from illada_lightning.model.attention import (
    attention,
    flash_attn_available,
    make_layout,
    reference_attention,
    varlen_available,
)

pytestmark = pytest.mark.gpu

BACKENDS = ["sdpa", "varlen"] + (["flash_attn"] if flash_attn_available() else [])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def packed_inputs(B=2, L=256, H=8, Hkv=2, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(B, L, h, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    cu = torch.tensor([0, 37, 200, 256, 300, 512], dtype=torch.int32, device="cuda")
    return mk(H), mk(Hkv), mk(Hkv), cu


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_forward_matches_reference(backend):
    if backend == "varlen" and not varlen_available():
        pytest.skip("torch.nn.attention.varlen not available")
    q, k, v, cu = packed_inputs()
    B, L, H, D = q.shape
    layout = make_layout(B, L, cu, None, "cuda")
    out = attention(q, k, v, layout, backend).reshape(B * L, H, D)
    ref = reference_attention(q.reshape(B * L, H, D), k.reshape(B * L, -1, D), v.reshape(B * L, -1, D), cu)
    assert out.isfinite().all()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
def test_backend_gradients_match_sdpa(backend):
    q, k, v, cu = packed_inputs(seed=1)
    B, L, H, D = q.shape
    layout = make_layout(B, L, cu, None, "cuda")
    grads = {}
    for name in ("sdpa", backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, layout, name)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for g_ref, g in zip(grads["sdpa"], grads[backend]):
        assert rel_err(g, g_ref) < 2e-2


def test_whole_model_backends_agree_bf16():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=512, max_seq_len=512, attention_backend="sdpa").cuda()
    ids = torch.randint(4, 512, (2, 256), device="cuda")
    cu = torch.tensor([0, 100, 256, 300, 512], dtype=torch.int32, device="cuda")
    outs = {}
    for backend in BACKENDS:
        model.config.attention_backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[backend] = model(ids, cu_seqlens=cu, max_seqlen=212).float()
    for backend in BACKENDS[1:]:
        assert rel_err(outs[backend], outs["sdpa"]) < 2e-2


def test_auto_picks_a_varlen_kernel_on_gpu():
    from illada_lightning.model.attention import resolve_backend

    chosen = resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert chosen in ("varlen", "flash_attn")
