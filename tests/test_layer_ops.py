"""glmkit's compiled RMSNorm and one-query attention (csrc/layer_ops.cpp) against torch's, and in the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

import glmkit.model as model_module
from glmkit import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU lacks AVX-512 VNNI/VBMI, or no compiler")

ops = torch.ops.glmkit_cpu if cpu_kernels.available() else None


def ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 steps between same-signed values."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 5, 100), (7, 33)])
def test_rms_norm_equals_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    assert torch.allclose(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, w.shape, w, 1e-5), rtol=2e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    got, want = ops.rms_norm(xb, wb, 1e-5), F.rms_norm(xb, wb.shape, wb, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == xb.shape
    assert ulps_bf16(got, want).max() <= 1  # the float32 sum of squares may round differently, once in a while
    assert (got == want).float().mean() > 0.99


def test_rms_norm_takes_strided_inputs_and_rejects_a_wrong_weight():
    x = torch.randn(8, 64).t()  # (64, 8), not contiguous
    w = torch.rand(8)
    assert torch.allclose(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, w.shape, w, 1e-6), rtol=2e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="rms_norm weight has 7 values for 8 features"):
        ops.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x.half(), w, 1e-6)


def reference_attention(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], 1, -1)


# Heads per group: 16 (the 6B model's), 4 (the serving benchmark's), 1, 3, 18 (16 + 2), 2, 1, 8
@pytest.mark.parametrize("B,H,G,D,S", [(1, 32, 2, 128, 300), (4, 8, 2, 128, 77), (2, 4, 4, 16, 9), (3, 6, 2, 40, 33),
                                       (2, 36, 2, 64, 20), (1, 2, 1, 256, 5), (2, 3, 3, 8, 1), (2, 16, 2, 72, 23)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_equals_softmax_attention(B, H, G, D, S, dtype):
    g = torch.Generator().manual_seed(B * 1000 + S)
    q, k, v = (torch.randn(B, n, t, D, generator=g).to(dtype) for n, t in ((H, 1), (G, S), (G, S)))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[..., -1] = True
    for m in (None, mask, mask[:1]):  # none, per row, one for all rows
        got = ops.attention_decode(q, k, v, m)
        assert got.shape == (B, 1, H * D) and got.dtype == dtype
        want = reference_attention(q, k, v, m)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.double() - want).abs().max() < tol


@pytest.mark.parametrize("H", [32, 8, 4])  # 16, 4 and 2 heads per group: lanes as heads, or as (key, head) pairs
def test_attention_decode_ignores_padding_and_neighbours_bit_for_bit(H):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, H, 1, 128, generator=g).bfloat16()
    k, v = (torch.randn(3, 2, 40, 128, generator=g).bfloat16() for _ in range(2))
    alone = ops.attention_decode(q[1:2], k[1:2, :, 10:], v[1:2, :, 10:], None)  # row 1's 30 keys, unpadded
    mask = torch.zeros(3, 1, 1, 40, dtype=torch.bool)
    mask[..., 10:] = True  # the same keys behind 10 padding columns, in a batch of 3
    batched = ops.attention_decode(q, k, v, mask)
    assert torch.equal(batched[1:2], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_reads_a_paged_pool_through_slots_as_the_gathered_keys(dtype):
    """Pools (N, G, D) and each row's slots (B, S): the same bits as the keys and values gathered first."""
    g = torch.Generator().manual_seed(7)
    B, H, G, D, S, N = 3, 8, 2, 64, 21, 100
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k_pool, v_pool = (torch.randn(N, G, D, generator=g).to(dtype) for _ in range(2))
    slots = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B)])  # scattered, in no order
    slots[0, :5] = slots[1, :5]  # rows may share slots (a shared prompt prefix)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True
    gathered_k = k_pool[slots].permute(0, 2, 1, 3)  # (B, G, S, D)
    gathered_v = v_pool[slots].permute(0, 2, 1, 3)
    for m in (None, mask):
        got = ops.attention_decode(q, k_pool, v_pool, m, slots)
        assert torch.equal(got, ops.attention_decode(q, gathered_k, gathered_v, m))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.double() - reference_attention(q, gathered_k, gathered_v, m)).abs().max() < tol
    with pytest.raises(RuntimeError, match="slot 100 is outside the pool of 100 slots"):
        ops.attention_decode(q, k_pool, v_pool, None, slots.masked_fill(slots == slots[2, 3], N))
    with pytest.raises(RuntimeError, match="slots must be int64"):
        ops.attention_decode(q, k_pool, v_pool, None, slots.int())
    with pytest.raises(RuntimeError, match="pools k, v"):
        ops.attention_decode(q, gathered_k, gathered_v, None, slots)


def test_attention_decode_reads_a_cache_slice_in_place():
    cache = torch.randn(2, 3, 2, 50, 64)  # (layers, B, G, capacity, D): keys of a preallocated cache
    q = torch.randn(3, 8, 1, 64)
    k, v = cache[0, :, :, :21], cache[1, :, :, :21]  # strided views
    assert torch.allclose(ops.attention_decode(q, k, v, None), reference_attention(q, k, v, None).float(), atol=1e-5)


def test_attention_decode_rejects_what_it_cannot_compute():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=r"q \(B, H, 1, D\)"):
        ops.attention_decode(torch.randn(1, 4, 2, 16), k, k, None)
    with pytest.raises(RuntimeError, match="do not fit queries"):
        ops.attention_decode(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), None)
    with pytest.raises(RuntimeError, match="of one type"):
        ops.attention_decode(q, k.bfloat16(), k.bfloat16(), None)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        ops.attention_decode(q, k, k, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        ops.attention_decode(torch.randn(1, 2, 1, 272), torch.randn(1, 2, 3, 272), torch.randn(1, 2, 3, 272), None)


def decode(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Greedy decode with a KV cache: the prompt's logits and the ids that follow."""
    with torch.no_grad():
        cache = model.new_kv_cache(prompt.shape[0], prompt.shape[1] + steps)
        logits = model(prompt, kv_cache=cache)
        ids, token = [], logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            ids.append(int(token))
            token = model(token, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return logits, ids


def test_the_model_decodes_with_them_as_with_torchs_ops(monkeypatch):
    model = tiny_model(seed=3)
    prompt = torch.randint(0, model.config.padded_vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    called = []
    original = ops.attention_decode
    monkeypatch.setattr(torch.ops.glmkit_cpu, "attention_decode", lambda *a: called.append(1) or original(*a))
    logits, ids = decode(model, prompt, 10)
    assert len(called) == 10 * model.config.num_layers  # every decode step of every layer, no prompt
    monkeypatch.setattr(model_module, "compiled_ops", lambda x: False)
    torch_logits, torch_ids = decode(model, prompt, 10)
    assert ids == torch_ids
    assert torch.allclose(logits, torch_logits, atol=1e-5)


def test_training_keeps_torchs_ops_and_their_gradients():
    model = tiny_model(seed=4).train()
    ids = torch.randint(0, model.config.padded_vocab_size, (1, 6))
    norm = model.transformer.encoder.layers[0].input_layernorm
    x = torch.randn(2, 3, model.config.hidden_size, requires_grad=True)
    norm(x).sum().backward()  # the compiled op has no backward: torch's must run here
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model(ids).sum().backward()
    assert all(p.grad is not None for p in model.transformer.encoder.layers[0].parameters())
