"""The serving engine's greedy head: the bfloat16 screen (`Bf16Screen`) picks exactly the fp32 head's argmax, also
where two tokens' logits differ by far less than bfloat16 can tell apart, with a bias, and when near-flat logits
send it to the full fp32 head."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from leantune.serve import screen as screen_module
from leantune.serve.screen import Bf16Screen

pytestmark = pytest.mark.skipif(not Bf16Screen.applies(nn.Linear(2, 2)), reason="no bfloat16 oneDNN on this CPU")


def head_of(V: int, C: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(C, V, bias=bias)
    with torch.no_grad():
        head.weight.normal_(0, 0.5)
        if bias:
            head.bias.normal_(0, 1.0)
    return head


@pytest.mark.parametrize("bias", [False, True])
def test_random_rows_pick_the_fp32_argmax(bias):
    head = head_of(3000, 64, bias)
    x = torch.randn(40, 64) * 3
    with torch.no_grad():
        assert torch.equal(Bf16Screen(head).argmax(x), head(x).argmax(-1))


def test_a_near_tie_bfloat16_cannot_see_is_decided_in_fp32():
    """Tokens 7 and 11 lead by far and token 11's logit is 1e-4 above token 7's (bfloat16 rounds both to one value):
    the pick is 11, not the first of a bfloat16 tie; then a bias puts token 7 1e-4 ahead, and the pick follows."""
    head = head_of(500, 32)
    x = torch.randn(2, 32)
    with torch.no_grad():
        base = x[0] / x[0].norm() * 8  # logit ~ 8 |x0| for row 0
        head.weight[7] = base
        head.weight[11] = base + 1e-4 * x[0] / x[0].norm() ** 2  # x0 . w11 = x0 . w7 + 1e-4
        x[1] = x[0]
        head.bias = nn.Parameter(torch.zeros(500))
        logits = head(x)
        assert logits[0, 11] > logits[0, 7] and (logits[0, 11] - logits[0, 7]).abs() < 1e-3
        assert logits[0, 11].bfloat16() == logits[0, 7].bfloat16()
        assert int(logits[0].argmax()) == 11
        got = Bf16Screen(head).argmax(x)
        assert got.tolist() == [11, 11]
        head.bias[7] = 2e-4  # now token 7 leads by 1e-4
        assert Bf16Screen(head).argmax(x).tolist() == head(x).argmax(-1).tolist() == [7, 7]


@pytest.mark.parametrize("bias", [False, True])
def test_rows_unsure_of_their_candidates_score_the_tokens_still_in_the_running(bias, monkeypatch):
    """With 2 candidates a row most often cannot prove its winner among them: the tokens whose bound still reaches the
    best candidate are scored in fp32, and the picks are the fp32 argmax without the full head."""
    head = head_of(3000, 64, bias)
    x = torch.randn(40, 64) * 3
    screen = Bf16Screen(head)
    screen.k = 2
    calls = []
    real = screen_module.F.linear
    monkeypatch.setattr(screen_module.F, "linear", lambda *a: calls.append(1) or real(*a))
    widened = []
    real_widen = screen._widen
    screen._widen = lambda x_, *a: widened.append(len(x_)) or real_widen(x_, *a)
    with torch.no_grad():
        want = head(x).argmax(-1)
        calls.clear()
        assert torch.equal(screen.argmax(x), want)
    assert widened and widened[0] > 0 and not calls  # unsure rows were widened, never through the full head


def test_near_flat_logits_fall_back_to_the_fp32_head(monkeypatch):
    """Rows of a near-constant head leave every token a candidate: the full fp32 head decides (same pick)."""
    head = head_of(1000, 16)
    calls = []
    real = screen_module.F.linear
    monkeypatch.setattr(screen_module.F, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        head.weight.copy_(head.weight[:1] + 1e-5 * torch.randn(1000, 16))
        x = torch.randn(3, 16)
        want = head(x).argmax(-1)
        calls.clear()
        assert torch.equal(Bf16Screen(head).argmax(x), want)
    assert calls  # it went to the full head


def test_applies_only_to_a_plain_fp32_linear():
    assert Bf16Screen.applies(nn.Linear(8, 8))
    assert not Bf16Screen.applies(nn.Linear(8, 8).to(torch.bfloat16))
    assert not Bf16Screen.applies(nn.Sequential(nn.Linear(8, 8)))
