"""Supervised-only fused linear cross-entropy == plain cross-entropy over all logits, loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from leantune.peft.lora import LoRALinear
from leantune.train.loss import supervised_ce_sum


def reference(hidden, head, labels):
    logits = head(hidden).float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_fused_loss_and_grads_match_reference(bias, train_head, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(train_head)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    labels[1, -1] = -100
    ours = supervised_ce_sum(hidden, head, labels, chunk_size=chunk)
    ours.backward()
    got = {"h": hidden.grad.clone(), **{n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}}
    hidden.grad = None
    head.zero_grad()
    ref = reference(hidden, head, labels)
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["h"], hidden.grad, atol=1e-6, rtol=1e-5)
    for n, p in head.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5)
    assert ("weight" in got) == train_head


def test_peft_head_and_no_grad_paths():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    head = LoRALinear(base, [(0, 50)], r=4, scaling=2.0, dropout=0.0)
    torch.nn.init.normal_(head.lora_B)
    hidden = torch.randn(2, 5, 16)
    labels = torch.randint(0, 50, (2, 5))
    ours = supervised_ce_sum(hidden, head, labels, chunk_size=4)
    ours.backward()
    g = head.lora_A.grad.clone()
    head.zero_grad()
    reference(hidden, head, labels).backward()
    torch.testing.assert_close(g, head.lora_A.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(supervised_ce_sum(hidden, base, labels), reference(hidden, base, labels))


def test_no_supervised_tokens_gives_zero_with_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = supervised_ce_sum(hidden, torch.nn.Linear(8, 10), torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_no_supervised_tokens_still_gives_the_heads_tensors_a_zero_gradient():
    """An FSDP rank whose share has no supervised token must reduce-scatter the same gradients as the others; torch
    before 2.12 has no `set_reduce_scatter_unused_params`, so the head is never skipped: zero gradients, not None."""
    from leantune.peft.lora import LoRALinear

    hidden = torch.randn(2, 3, 8, requires_grad=True)
    plain = torch.nn.Linear(8, 10)
    lora = LoRALinear(torch.nn.Linear(8, 10, bias=False), [(0, 10)], r=2, scaling=2.0, dropout=0.0)
    for head in (plain, lora):
        loss = supervised_ce_sum(hidden, head, torch.full((2, 3), -100))
        loss.backward()
        assert loss.item() == 0.0
        trained = [p for p in head.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and not p.grad.any() for p in trained)


def test_cpu_workspace_is_reused_across_calls_and_sizes_without_stale_values():
    """The head's scratch buffers persist between steps on the CPU (no fresh, page-faulted mmap a step); calls with
    fewer, more, then fewer rows again, in fp32 and under bf16 autocast, each equal a fresh reference computation."""
    from leantune.train import loss as loss_mod

    loss_mod.release_head_caches()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    held = []
    for rows in (5, 12, 5):
        hidden = torch.randn(1, rows, 16, requires_grad=True)
        labels = torch.randint(0, 50, (1, rows))
        ours = supervised_ce_sum(hidden, head, labels)
        ours.backward()
        g = hidden.grad.clone()
        hidden.grad = None
        ref = reference(hidden, head, labels)
        ref.backward()
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, hidden.grad, atol=1e-6, rtol=1e-5)
        held.append(loss_mod._workspaces[(torch.float32, torch.device("cpu"))])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 logits buffer joins the fp32 one
            low = supervised_ce_sum(hidden.detach(), head, labels)
        torch.testing.assert_close(low, ref.detach(), atol=0.05 * rows, rtol=0.02)
    assert held[0].numel() == 5 * 50 and held[1].numel() == 12 * 50  # grown once for 12 rows,
    assert held[2] is held[1]  # then reused for 5
    assert (torch.bfloat16, torch.device("cpu")) in loss_mod._workspaces
    loss_mod.release_head_caches()
    assert not loss_mod._workspaces
