"""The static KV cache (attention over the whole buffer under a mask) and the compiled decode step (`--compile`)."""

import dataclasses

import pytest
import torch
from method_cases import EVERY_METHOD, tiny_args

from leantune.decode import compile as lt_compile
from leantune.decode.generate import generate_tokens, greedy_batch
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from tests.test_generate import CONFIGS

needs_inductor = pytest.mark.skipif(lt_compile.compile_unavailable_reason() is not None,
                                    reason="inductor cannot compile here (no C++ compiler)")


def tiny(name: str = "llama-gqa", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(vocab_size=97, block_size=64, **CONFIGS[name])).eval()
    with torch.no_grad():  # larger random weights so greedy continuations are not all one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


@torch.inference_mode()
def step_logits(model: GPT, prompt: torch.Tensor, steps: int, static: bool) -> torch.Tensor:
    """(steps, V) logits of greedy KV-cache decoding, the cache static (whole buffer, masked) or not."""
    model.set_kv_cache(1, 48, static=static)
    x, pos, out = prompt[None], torch.arange(len(prompt)), []
    try:
        for _ in range(steps):
            logits = model.lm_head(model.decode(x, pos, return_hidden=True)[:, -1])  # (1, V)
            out.append(logits[0])
            x, pos = logits.argmax(-1)[:, None], pos[-1:] + 1
    finally:
        model.clear_kv_cache()
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_cache_decodes_as_the_growing_cache(name):
    model = tiny(name)
    prompt = torch.randint(0, 97, (9,))
    static, growing = step_logits(model, prompt, 30, True), step_logits(model, prompt, 30, False)
    assert static.argmax(-1).tolist() == growing.argmax(-1).tolist()
    # fp32 sums over a masked whole buffer vs the grown cache: the same values up to reduction order (1.5e-5 seen on
    # an AVX512-BF16 CPU), far below what could change a greedy pick (asserted above)
    torch.testing.assert_close(static, growing, rtol=1e-4, atol=1e-4)
    assert len(set(growing.argmax(-1).tolist())) > 3, "degenerate continuation would make the comparison meaningless"


def test_static_cache_length_rounds_up_within_the_limit():
    step = lt_compile.STATIC_CACHE_STEP
    assert lt_compile.static_cache_length(1, 10_000) == step
    assert lt_compile.static_cache_length(step, 10_000) == step
    assert lt_compile.static_cache_length(step + 1, 10_000) == 2 * step
    assert lt_compile.static_cache_length(step + 1, step + 7) == step + 7


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_one_query_attention_equals_sdpa(groups):
    from leantune.models.decoder.model import one_query_attention

    g = torch.Generator().manual_seed(groups)
    B, nh, S, hs = 3, 4, 20, 8
    q = torch.randn(B, nh, 1, hs, generator=g)
    k, v = torch.randn(2, B, groups, S, hs, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[..., 0] = True  # every row sees a key
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=groups < nh)
    torch.testing.assert_close(one_query_attention(q, k, v, mask, scale=0.3), ref, rtol=1e-5, atol=1e-6)
    one = one_query_attention(q, k, v, mask[:1], scale=0.3)  # one mask for every row
    torch.testing.assert_close(one, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:1], scale=0.3, enable_gqa=groups < nh), rtol=1e-5, atol=1e-6)


@needs_inductor
def test_compiled_decoding_equals_eager():
    """fp32 (int8's compiled steps multiply in fp32 where its eager kernels round to bfloat16, so they are checked
    against the dequantized fp32 model instead: test_woq.py)."""
    model = tiny()
    prompt = torch.randint(0, 97, (9,))
    eager = list(generate_tokens(model, prompt, 30))
    assert list(generate_tokens(model, prompt, 30, compiled=True)) == eager
    assert len(set(eager)) > 3
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    stop = [5]
    assert greedy_batch(model, prompts, 12, stop, compiled=True) == greedy_batch(model, prompts, 12, stop)


@needs_inductor
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_compiled_decoding_equals_eager_with_every_method(method):
    """Adapters in the compiled step (LLaMA-Adapter's gated prefix after the fused one-token attention, virtual
    tokens in the static cache, unmerged LoRA-family branches) decode as they do eager."""
    model = tiny()
    names = apply_method(model, method, tiny_args(method))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-zero trained state, so each method changes the continuation
        params = dict(model.named_parameters())
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.3)
    model.eval().requires_grad_(False)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1))
    eager = list(generate_tokens(model, prompt, 20))
    assert list(generate_tokens(model, prompt, 20, compiled=True)) == eager
    assert len(set(eager)) > 3


def _lora(seed: int, **args) -> GPT:
    """The tiny model with a LoRA adapter of non-zero trained weights (seeded): same shapes, other values per seed
    (and other LoRAArgs, e.g. alpha, with `args`)."""
    model = tiny()
    args = dataclasses.replace(tiny_args("lora"), **args)
    names = apply_method(model, "lora", args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.3)
    return model.eval().requires_grad_(False)


@needs_inductor
def test_a_second_adapter_reuses_the_compiled_step():
    """An adapter's weights enter the compiled step as inputs, not constants: another LoRA of the same shapes decodes
    through the same graph (a recompile raises here) and each gives its own eager tokens."""
    first, second = _lora(5), _lora(6)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1))
    eager = [list(generate_tokens(m, prompt, 20)) for m in (first, second)]
    assert eager[0] != eager[1]
    assert list(generate_tokens(first, prompt, 20, compiled=True)) == eager[0]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert list(generate_tokens(second, prompt, 20, compiled=True)) == eager[1]


@needs_inductor
def test_an_adapter_with_another_alpha_and_dropout_reuses_the_compiled_step():
    """LoRA's scale alpha / r reaches the compiled step as a tensor input, not a baked constant, and eval's dropout
    is not traced at all: an adapter that differs only in alpha and dropout decodes through the same graph (no new
    graph, a recompile raises) and gets its own eager tokens, which differ from the first's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    first, second = _lora(5), _lora(5, alpha=3.0, dropout=0.3)
    assert first.transformer.h[0].attn.qkv.scaling != second.transformer.h[0].attn.qkv.scaling
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1))
    eager = [list(generate_tokens(m, prompt, 20)) for m in (first, second)]
    assert eager[0] != eager[1], "the scale must change the continuation, or the check below proves nothing"
    assert list(generate_tokens(first, prompt, 20, compiled=True)) == eager[0]
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert list(generate_tokens(second, prompt, 20, compiled=True)) == eager[1]
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.inference_mode():  # and the logits themselves, not only the picks, follow the second scale
        second.set_kv_cache(1, lt_compile.static_cache_length(12, second.max_tokens), static=True)
        try:
            second.decode(prompt[None], torch.arange(9), return_hidden=True)
            x, pos = prompt[-1:][None], torch.tensor([9])
            compiled = lt_compile.compiled_decode_step(second)(x, pos)  # (1, V)
        finally:
            second.clear_kv_cache()
        second.set_kv_cache(1, 12)
        try:
            second.decode(prompt[None], torch.arange(9), return_hidden=True)
            ref = lt_compile.decode_step(second, x, pos)  # (1, V)
        finally:
            second.clear_kv_cache()
    torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "loha", "lokr"])
def test_an_adapters_scale_is_a_graph_input_not_a_constant(method):
    """Every scaled adapter layer reads its scale as a tensor under torch.compile (`peft.scale.GraphScale`): layers
    that differ only in alpha trace one graph (a recompile raises) and each gives its eager output. Dynamo alone
    decides this (backend="eager"), so no C++ compile runs."""
    from leantune.methods import get_method

    layers = []
    for alpha in (2.0, 7.0):
        model = tiny()
        args = get_method(method).make_args(tiny_args(method))
        names = apply_method(model, method, dataclasses.replace(args, alpha=alpha))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same non-zero trained state for both
            params = dict(model.named_parameters())
            for n in names:
                params[n].add_(torch.randn(params[n].shape, generator=g) * 0.3)
        layers.append(model.eval().requires_grad_(False).transformer.h[0].attn.qkv)
    assert layers[0].scaling != layers[1].scaling
    x = torch.randn(2, 3, layers[0].in_features, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    forward = torch.compile(lambda layer, x: layer(x), backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = [layer(x) for layer in layers]
        assert not torch.allclose(eager[0], eager[1]), "the scale must change the output, or this proves nothing"
        torch.testing.assert_close(forward(layers[0], x), eager[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(forward(layers[1], x), eager[1])


@pytest.mark.parametrize(("requested", "budget", "compiled"), [
    (None, 256, False), (None, lt_compile.COMPILE_MIN_TOKENS - 1, False), (None, lt_compile.COMPILE_MIN_TOKENS, True),
    (True, 1, True), (False, 10**6, False),
])
def test_short_answers_stay_eager_unless_compile_is_forced(requested, budget, compiled, monkeypatch):
    monkeypatch.setattr(lt_compile, "compile_unavailable_reason", lambda device="cpu": None)  # a compiler, anywhere
    assert lt_compile.wants_compile(requested, budget) is compiled


def test_compiled_graphs_are_cached_in_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lt_compile.use_persistent_cache() == str(tmp_path / "leantune" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert lt_compile.use_persistent_cache() == str(tmp_path / "mine")


def test_compile_unavailable_is_not_wanted_so_the_commands_pack_for_eager(monkeypatch, caplog):
    """generate and chat decide before loading the step: without a compiler they take the packed eager path instead
    of compiled_decode_step's unprepared eager fallback; --compile true says why in one warning."""
    monkeypatch.setattr(lt_compile, "compile_unavailable_reason", lambda device="cpu": "no working C++ compiler (test)")
    with caplog.at_level("WARNING"):
        assert lt_compile.wants_compile(None, lt_compile.COMPILE_MIN_TOKENS) is False
        assert "--compile ignored" not in caplog.text  # not asked for: no warning
        assert lt_compile.wants_compile(True, 1) is False
    assert "--compile ignored, decoding eager: no working C++ compiler (test)" in caplog.text


def test_compile_unavailable_decodes_eager(monkeypatch, caplog):
    monkeypatch.setattr(lt_compile, "compile_unavailable_reason", lambda device="cpu": "no working C++ compiler (test)")
    model = tiny()
    prompt = torch.randint(0, 97, (5,))
    with caplog.at_level("WARNING"):
        assert list(generate_tokens(model, prompt, 8, compiled=True)) == list(generate_tokens(model, prompt, 8))
    assert "--compile ignored" in caplog.text


@needs_inductor
def test_generate_and_chat_commands_compile(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    import io
    import json

    from leantune.commands.chat import chat
    from leantune.commands.generate import generate

    kw = dict(prompt="Tell me about rivers.", checkpoint_dir=tiny_checkpoint, max_new_tokens=12, threads=1,
              quantize="int8")
    eager = generate(**kw)
    capsys.readouterr()
    assert generate(**kw, compile=True) == eager
    err = capsys.readouterr().err
    assert "compiling the decode step" in err and "[compiled in" in err and "tokens/s" in err
    monkeypatch.setattr(lt_compile, "COMPILE_MIN_TOKENS", 13)  # compile unset: a 12-token budget stays eager
    assert generate(**kw) == eager and "compiling" not in capsys.readouterr().err
    monkeypatch.setattr(lt_compile, "COMPILE_MIN_TOKENS", 12)  # ... and compiles once it reaches the break-even
    assert generate(**kw) == eager and "[compiled in" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hi\n/save {tmp_path / 'c.json'}\n"))
    chat(checkpoint_dir=tiny_checkpoint, temperature=0.0, max_new_tokens=4, threads=1, quantize="int8", compile=True)
    saved = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"]


def test_batched_weight_only_steps_stay_eager_on_prepacked_weights():
    from leantune.decode.woq import DENSE_BATCH
    from leantune.models.quantize import quantize_for_inference

    model = quantize_for_inference(tiny(), "int8")
    assert lt_compile.compiled_decode_step(model, DENSE_BATCH) is None
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in range(3, 3 + DENSE_BATCH)]
    eager = greedy_batch(model, prompts, 10, [5])
    assert greedy_batch(model, prompts, 10, [5], compiled=True) == eager
    dense = model.transformer.h[0].attn.qkv.weight.weight_only.dense  # made by the first batched call
    assert dense is not None and (dense.is_mkldnn or not torch.ops.mkldnn._is_mkldnn_bf16_supported())
