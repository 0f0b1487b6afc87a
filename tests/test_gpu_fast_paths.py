"""GPU checks of issue 23's fast paths (device machine: `python -m pytest tests/test_gpu_fast_paths.py -m gpu`).

The compiled loss kernel against the eager chunks, float8 linears against bf16, the deferred non-finite check with
CUDA events and pinned copies, and the CUDA-graph replay of the sampler's cached steps against eager steps. The
CPU halves of these checks are in test_objective.py, test_training_module.py and test_kv_cache.py.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from illada_lightning import build_model
from illada_lightning.diffusion import block_cache
from illada_lightning.diffusion.cross_entropy import linear_cross_entropy
from illada_lightning.diffusion.objective import diffusion_loss
from illada_lightning.diffusion.sampler import generate
from illada_lightning.model.config import ModelConfig
from illada_lightning.training.callbacks import NonFiniteLossGuard
from illada_lightning.training.module import PretrainModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fused_loss_compiles_and_matches_the_eager_chunks():
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 5000, 512, 50_000  # chunks of 2048: two full ones and a shorter one (a second shape)
    h0 = torch.randn(n, d, device="cuda", generator=g)
    w0 = 0.05 * torch.randn(v, d, device="cuda", generator=g)
    tgt = torch.randint(0, v, (n,), device="cuda", generator=g)
    tw = torch.rand(n, device="cuda", generator=g)
    results = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, nll = linear_cross_entropy(h, w, tgt, tw, chunk_size=2048, fused=fused)
        loss.backward()
        results.append((loss.detach(), nll, h.grad, w.grad))
    (loss_e, nll_e, gh_e, gw_e), (loss_f, nll_f, gh_f, gw_f) = results
    torch.testing.assert_close(nll_f, nll_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-3, rtol=1e-5)
    assert _rel(gh_f, gh_e) < 5e-3 and _rel(gw_f, gw_e) < 5e-3  # the same float32 math, bf16-rounded gradients


def test_float8_linears_train_like_bf16_and_compile():
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 tensor cores")
    from illada_lightning.training.float8 import convert_to_float8

    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=1024,
                        max_seq_len=512, tie_embeddings=False).cuda()
    ref = copy.deepcopy(model)
    names = convert_to_float8(model, "gpu")
    assert sorted(names) == sorted(f"blocks.{i}.{m}" for i in range(2)
                                   for m in ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down"))
    assert list(model.state_dict()) == list(ref.state_dict())  # checkpoints stay interchangeable
    model.compile_blocks()
    ids = torch.randint(8, 1024, (4, 512), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    out = []
    for m in (ref, model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion_loss(m, ids, mask_token_id=3, generator=torch.Generator(device="cuda").manual_seed(2)).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_ref, grads_ref), (loss_f8, grads_f8) = out
    assert abs(float(loss_f8) / float(loss_ref) - 1) < 2e-2, (float(loss_f8), float(loss_ref))
    rel = [_rel(grads_f8[n], grads_ref[n]) for n in grads_ref]
    # e4m3 activations/weights and e5m2 gradients (2 mantissa bits): torchao's emulated float8 gives 0.09-0.11
    # mean and 0.12-0.15 worst relative error on this model (CPU, 3 seeds); a broken cast or scale gives O(1)
    assert max(rel) < 0.3 and sum(rel) / len(rel) < 0.2, rel


def test_deferred_nan_check_skips_on_the_gpu_and_stops_a_step_later(tmp_path):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=128, max_seq_len=64)

    class NaNAt3(PretrainModule):
        def _loss(self, batch, generator):
            out = super()._loss(batch, generator)
            if self.training and self.global_step == 3:
                out.loss = out.loss * float("nan")
            return out

    class Snapshot(pl.Callback):
        weights = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 3:
                Snapshot.weights = {n: p.detach().clone() for n, p in module.named_parameters()}

    torch.manual_seed(0)
    module = NaNAt3(cfg, nan_check="deferred")
    guard = NonFiniteLossGuard("stop", tmp_path)
    batches = [{"input_ids": torch.randint(8, 128, (2, 64))} for _ in range(12)]
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=12, precision="bf16-mixed", gradient_clip_val=1.0,
                         callbacks=[guard, Snapshot()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert guard.triggered_step == 3 and trainer.global_step < 12 and "loss became non-finite" in guard.reason
    for name, value in module.named_parameters():  # steps 3 and 4 were skipped inside the fused AdamW
        # (Lightning's teardown has moved the module back to the CPU)
        assert torch.equal(value.detach().cpu(), Snapshot.weights[name].cpu()), name
    assert (tmp_path / "nonfinite-step=0000003.ckpt").is_file()
    assert [s for s, _ in module.first_losses] == [0, 1, 2, 4][: len(module.first_losses)]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_graph_replay_decodes_the_same_tokens(cache):
    torch.manual_seed(0)
    model = build_model("small", init_std=0.2).cuda().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, 8192, (int(n),), generator=g).tolist() for n in torch.randint(16, 96, (8,), generator=g)]
    opts = dict(gen_length=64, steps=64, block_length=16, logits_eos_inf=True, cache=cache)
    eager = generate(model, prompts, **opts)
    before = dict(block_cache.graph_counts)
    graphed = generate(model, prompts, cuda_graph=True, **opts)
    counts = {k: v - before[k] for k, v in block_cache.graph_counts.items()}
    assert counts["failed"] == 0 and counts["captured"] == 4 and counts["replayed"] == 4 * 13, counts
    same = sum(a == b for x, y in zip(eager, graphed) for a, b in zip(x, y)) / (8 * 64)
    assert same >= 0.98, same  # the same kernels on the same inputs (identical unless cuBLAS picks another path)
