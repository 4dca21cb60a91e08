"""The attention of the server's batched decode step: on a bf16 slot cache (CPU without AMX) it runs on fp32 q, k, v
and equals a float64 reference over each row's own columns to bf16 rounding; prefill chunks and `generate`'s own
KVCache keep bf16 attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT, KVCache, apply_rope
from leantune.runtime import cpu_has_amx
from leantune.serve.cache import SlotKVCache, SlotLayout

pytestmark = pytest.mark.skipif(cpu_has_amx(), reason="with AMX the slot cache keeps bf16 attention")


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtypes of (q, k, v) of every SDPA call the test makes."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_decode_step_attention_runs_in_fp32_and_equals_a_float64_reference(sdpa_dtypes):
    torch.manual_seed(0)
    cfg = Config(vocab_size=97, block_size=64, n_layer=1, n_embd=64, n_head=4, n_query_groups=2,
                 norm_class="rmsnorm", mlp_class="swiglu", intermediate_size=64)
    model = GPT(cfg).to(torch.bfloat16).eval()
    attn, B, ng, hs, nh = model.transformer.h[0].attn, 4, cfg.n_query_groups, cfg.head_size, cfg.n_head
    layout = SlotLayout(capacity=32)
    cache = SlotKVCache(layout, B, ng, hs, "cpu", torch.bfloat16)
    cache.ensure_filled(33)
    cache.k.normal_(0, 2), cache.v.normal_(0, 1)  # large keys: peaked softmaxes, where rounding shows
    cols = torch.tensor([3, 9, 20, 0])  # each row's new column; row b sees its columns 0..cols[b]
    S = int(cols.max()) + 1
    layout.decode(0, B, cols, S)
    mask = (torch.arange(S)[None] <= cols[:, None])[:, None, None]  # (B, 1, 1, S)
    x = torch.randn(B, 1, cfg.n_embd).to(torch.bfloat16)
    cos, sin = model.rope_cache(x.device)
    cos, sin = cos[cols][:, None, None].to(x.dtype), sin[cols][:, None, None].to(x.dtype)  # (B, 1, 1, rope_n)
    k_before, v_before = cache.k.clone(), cache.v.clone()
    outputs = []
    attn.proj.register_forward_pre_hook(lambda m, args: outputs.append(args[0]))
    attn.kv_cache = cache
    assert cache.attend_fp32
    with torch.no_grad():
        attn(x, cos, sin, mask, torch.tensor([S - 1]))
        q, k, v = attn.qkv(x).split(cfg.qkv_sizes, dim=-1)  # the reference: the same bf16 projections
    assert sdpa_dtypes == [(torch.float32,) * 3]
    y = outputs[0].view(B, nh, hs)
    q = apply_rope(q.view(B, 1, nh, hs).transpose(1, 2), cos, sin)  # (B, nh, 1, hs)
    k = apply_rope(k.view(B, 1, ng, hs).transpose(1, 2), cos, sin)  # (B, ng, 1, hs)
    v = v.view(B, 1, ng, hs).transpose(1, 2)
    for b in range(B):
        c = int(cols[b])
        keys, values = k_before[b, :, :c + 1].double(), v_before[b, :, :c + 1].double()  # (ng, c + 1, hs)
        keys[:, c], values[:, c] = k[b, :, 0].double(), v[b, :, 0].double()  # the row's new token, written first
        assert torch.equal(cache.k[b, :, c], k[b, :, 0]) and torch.equal(cache.v[b, :, c], v[b, :, 0])
        rep = nh // ng  # query head i reads KV head i // rep
        scores = torch.einsum("hd,hsd->hs", q[b, :, 0].double(), keys.repeat_interleave(rep, 0)) / math.sqrt(hs)
        ref = torch.einsum("hs,hsd->hd", scores.softmax(-1), values.repeat_interleave(rep, 0))  # (nh, hs)
        # fp32 attention rounded once to bf16: within one bf16 step (2^-8 relative) of the exact result
        torch.testing.assert_close(y[b].double(), ref, rtol=2 ** -8, atol=1e-6)

    # a prefill chunk over the same cache, and generate's KVCache, keep bf16 attention
    layout.prefill(1)
    assert not cache.attend_fp32
    sdpa_dtypes.clear()
    attn.kv_cache = KVCache(1, ng, 16, hs, "cpu", torch.bfloat16)
    with torch.no_grad():
        attn(x[:1], cos[:1], sin[:1], None, torch.tensor([0]))
    assert sdpa_dtypes == [(torch.bfloat16,) * 3]


def test_an_fp32_slot_cache_keeps_its_attention_as_it_is():
    layout = SlotLayout(capacity=8)
    layout.decode(0, 2, torch.tensor([1, 2]), 3)
    assert not SlotKVCache(layout, 2, 2, 8, "cpu", torch.float32).attend_fp32
    assert SlotKVCache(layout, 2, 2, 8, "cpu", torch.bfloat16).attend_fp32
