"""The served copy's block linears in oneDNN's packed layout: the same products as F.linear up to rounding, each row
independent of its batch (so a request decodes alike alone or batched), bias and any leading shape kept, bfloat16
too, and no packing past PACK_MAX_BYTES or of layers that are not plain CPU linears."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.decode import packed as packed_module
from leantune.decode.packed import PackedLinear, pack_block_linears, packable

pytestmark = pytest.mark.skipif(not packable(nn.Linear(2, 2)), reason="no oneDNN on this build")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_rows_equal_f_linear_and_do_not_depend_on_the_batch(bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias)
    p = PackedLinear(layer)
    x = torch.randn(16, 3, 96)  # (B, T, in)
    with torch.no_grad():
        y = p(x)
        assert y.shape == (16, 3, 160)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        for n in (1, 5):
            assert torch.equal(p(x[:n]), y[:n])  # a row's result is the same in any batch


def test_bfloat16_layers_pack_too():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bfloat16 oneDNN on this CPU")
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(layer)(x), layer(x), rtol=2e-2, atol=2e-2)


def test_pack_block_linears_swaps_plain_linears_within_the_budget(monkeypatch):
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)) for _ in range(2)])
    assert pack_block_linears(blocks) == 4
    assert all(isinstance(b[0], PackedLinear) and isinstance(b[1], nn.LayerNorm) for b in blocks)
    monkeypatch.setattr(packed_module, "PACK_MAX_BYTES", 10)
    fresh = nn.ModuleList([nn.Linear(8, 8)])
    assert pack_block_linears(fresh) == 0 and type(fresh[0]) is nn.Linear  # over the budget: left as is
    assert not packable(nn.Linear(8, 8).to(torch.float16)) and not packable(nn.Conv1d(2, 2, 1))
