"""The hand-fused ops (leantune.models.ops) and the fused cross-entropy equal the plain PyTorch expressions."""

import pytest
import torch

from leantune.models import ops
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import RMSNorm, apply_rope, build_rope_cache


def _grads(fn, *inputs):
    """Output and input gradients for a fixed random upstream gradient (seeded, so both sides get the same)."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)


def _ref_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_matches_reference(train_weight):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).requires_grad_()
    w = (torch.rand(64) + 0.5).requires_grad_(train_weight)
    out, grads = _grads(lambda a, b: ops.rms_norm(a, b, 1e-5), x, w)
    ref, ref_grads = _grads(lambda a, b: _ref_rms(a, b, 1e-5), x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads) == 1 + train_weight
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_rms_norm_module_uses_fused_path_and_matches():
    torch.manual_seed(0)
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormFnBackward"
    torch.testing.assert_close(y, _ref_rms(x, norm.weight, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope_n_elem", [16, 8])  # full and partial rotary
def test_rope_matches_reference(rope_n_elem):
    torch.manual_seed(0)
    cfg = Config(block_size=32, n_embd=64, n_head=4, rotary_percentage=rope_n_elem / 16)
    assert cfg.rope_n_elem == rope_n_elem
    cos, sin = build_rope_cache(cfg, "cpu")
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]])  # per-row positions, as packing makes
    cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (B, 1, T, n)
    base = torch.randn(2, 5, 4, 16)
    x = base.transpose(1, 2).requires_grad_()  # (B, nh, T, hs), a strided view like the model's q
    out, (g,) = _grads(lambda a: ops.rope(a, cos, sin), x)
    ref, (rg,) = _grads(lambda a: apply_rope(a, cos, sin), x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)


def test_fused_ce_survives_underflowing_target_probability():
    """A target with p_y below fp32 range must give the exact (large, finite) loss, not inf."""
    from leantune.train.loss import supervised_ce_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(200.0)  # logit gaps of hundreds: exp underflows to 0 for most classes
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    logits = head(hidden.detach())[0]
    labels = logits.argmin(-1)[None]  # the least likely class everywhere
    ours = supervised_ce_sum(hidden, head, labels, chunk_size=4)
    ref = torch.nn.functional.cross_entropy(logits.double(), labels[0], reduction="sum")
    assert torch.isfinite(ours) and ours.item() > 1000
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-3)
    ours.backward()
    assert torch.isfinite(hidden.grad).all()


def test_a_block_norm_under_autocast_writes_the_autocast_dtype_with_the_same_values_and_gradients():
    """A block's RMSNorm feeds only linears, which autocast casts to bf16: it writes bf16 itself (the fp32 result rounded
    once), and its backward takes that bf16 gradient to the fp32 one the cast's backward would have given. The final
    norm (ln_f, whose output is the hidden state callers read) stays fp32."""
    from leantune.models.decoder.model import GPT

    torch.manual_seed(0)
    model = GPT(Config(block_size=16, n_layer=1, n_embd=32, n_head=4, n_query_groups=2, vocab_size=40))
    norm = model.transformer.h[0].norm_1
    assert norm.feeds_linears and not model.transformer.ln_f.feeds_linears
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32, requires_grad=True)
    g = torch.randn(2, 7, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        ref = _ref_rms(x, norm.weight, norm.eps).to(torch.bfloat16)  # what the consumers' cast made before
        assert model.transformer.ln_f(x).dtype == torch.float32
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    assert gx.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    assert norm(x).dtype == torch.float32  # outside autocast: fp32 as before


def test_cpu_dropout_draws_each_value_with_p_rounded_to_2_to_the_minus_16():
    """ops.dropout's mask: 16-bit lanes of 64-bit random words. Every value is 0 or x / (1 - p') with p' = p rounded to
    a multiple of 2^-16; each of the four lanes of a word drops at p' (a 63-bit draw would never drop the top lane);
    the gradient is the same mask and scale; the mask is what backward keeps (bool, not a float noise tensor)."""
    torch.manual_seed(0)
    n = 1 << 20
    x = (torch.rand(n) + 1).requires_grad_()  # no zeros: a zero output is a dropped value
    for p in (0.05, 0.3):
        drop = round(p * 65536)
        scale = 65536 / (65536 - drop)
        out = ops.dropout(x, p)
        dropped = out == 0
        assert torch.equal(out[~dropped], (x[~dropped] * scale).detach())
        assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.bool]
        sd = (p * (1 - p) / (n / 4)) ** 0.5
        for lane in range(4):  # each lane of the 64-bit words on its own
            assert abs(dropped.view(-1, 4)[:, lane].float().mean().item() - drop / 65536) < 5 * sd, (p, lane)
        (g,) = torch.autograd.grad(out, x, torch.full((n,), 2.0))
        torch.testing.assert_close(g, (~dropped).float() * 2 * scale)
    torch.manual_seed(1)
    a = ops.dropout(x, 0.1)
    torch.manual_seed(1)
    assert torch.equal(a, ops.dropout(x, 0.1))  # the global generator: seeds and resume's RNG state hold
    assert ops.dropout(x, 0.1, training=False) is x and ops.dropout(x, 0.0) is x
    half = ops.dropout(x.detach().bfloat16(), 0.1)
    assert half.dtype == torch.bfloat16 and not half.requires_grad
    module = ops.Dropout(0.1)
    assert isinstance(module, torch.nn.Dropout) and module.eval()(x) is x
