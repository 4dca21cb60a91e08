"""Regional torch.compile of the blocks (leantune.decode.compile): same loss and gradients as eager, clean fallback."""

import copy

import pytest
import torch

from leantune.decode import compile as lt_compile
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.lora import LoRAArgs, apply_lora
from leantune.train.loss import supervised_ce_sum


def _lora_model():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=101, block_size=32, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                       intermediate_size=96))
    names = apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)  # nonzero B so lora_A gets a gradient too
    return model.train(), names


def _loss_and_grads(model, names, x, labels):
    loss = supervised_ce_sum(model(x, return_hidden=True), model.lm_head, labels) / labels.numel()
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), {n: params[n].grad.clone() for n in names}


@pytest.mark.skipif(lt_compile.compile_unavailable_reason() is not None, reason="inductor cannot compile here")
def test_compiled_training_step_matches_eager():
    """Tolerance: fp32 with fused reductions reordered by inductor; 1e-5 relative / 1e-6 absolute."""
    eager, names = _lora_model()
    compiled = copy.deepcopy(eager)
    assert lt_compile.compile_blocks(list(compiled.transformer.h))
    x = torch.randint(0, 101, (2, 16))
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    ref_loss, ref_grads = _loss_and_grads(eager, names, x, labels)
    for _ in range(2):  # the second call reuses the compiled graphs
        compiled.zero_grad(set_to_none=True)
        loss, grads = _loss_and_grads(compiled, names, x, labels)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for n in names:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert all(b._compiled_call_impl is not None for b in compiled.transformer.h)
    lt_compile.uncompile_blocks(list(compiled.transformer.h))
    assert all(b._compiled_call_impl is None for b in compiled.transformer.h)


def test_no_compiler_falls_back_to_eager(monkeypatch, caplog, request):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    lt_compile._cpu_compiler_problem.cache_clear()  # the probe's answer is kept per process
    request.addfinalizer(lt_compile._cpu_compiler_problem.cache_clear)
    model, _ = _lora_model()
    assert "no working C++ compiler" in lt_compile.compile_unavailable_reason("cpu")
    with caplog.at_level("WARNING"):
        assert lt_compile.compile_blocks(list(model.transformer.h)) is False
    assert "running eager" in caplog.text
    assert all(b._compiled_call_impl is None for b in model.transformer.h)
