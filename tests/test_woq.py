"""Weight-only int8 / int4 decoding (`--quantize int8|int4`): torch's CPU kernels against the dequantized fp32
weights, greedy decoding against the dequantized-weights model, adapters on top, and the commands' flags."""

import copy
import warnings

import pytest
import torch
from method_cases import EVERY_METHOD, tiny_args

from leantune.cli import main
from leantune.decode.generate import generate_tokens, greedy_batch
from leantune.decode.woq import (
    DENSE_BATCH,
    INT4_GROUP,
    SCREEN_CANDIDATES,
    add_screen,
    int4_dequantize_codes,
    int4_quantize,
    int8_quantize,
    quantize_weight_only,
    screened_argmax,
)
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import (
    QuantLinear,
    check_mode,
    compute_dtype_of,
    dequantize_model,
    dequantize_weight,
    greedy_tokens,
    is_quantized,
    logical_numel,
    quantize_for_inference,
    quantized_linear,
    storage_tensors,
)
from leantune.peft.lora import LoRAArgs

MODES = ("int8", "int4")
V = 97


def bf16_input_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernels compute: the input rounded to bfloat16, then an fp32 product with the fp32 weight."""
    return torch.nn.functional.linear(x.bfloat16().float(), w.float(), bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_kernel_equals_the_dequantized_fp32_product(mode, lead):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    x = torch.randn(*lead, 96, generator=g)
    p = quantize_weight_only(w, mode, torch.float32)
    if mode == "int8":
        q, scales = int8_quantize(w)
        deq = q.float() * scales.float()[:, None]
    else:
        q, sz = int4_quantize(w)
        deq = int4_dequantize_codes(q, sz)
    assert torch.equal(dequantize_weight(p), deq)  # the int4 read-back of the packed layout is exact too
    y = quantized_linear(x, p, b)
    ref = bf16_input_reference(x, deq, b)
    assert y.dtype == torch.float32 and y.shape == (*lead, 48)
    # fp32 accumulation; only the kernel's bfloat16 output rounding (2^-8 relative) separates the two
    assert (y - ref).abs().max() <= 2 ** -8 * ref.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_batched_calls_use_a_bf16_copy_of_the_same_weights(mode):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    p = quantize_weight_only(w, mode, torch.float32)
    x = torch.randn(DENSE_BATCH, 3, 96, generator=g)  # DENSE_BATCH sequences: the dense GEMM path
    quantized_linear(x[:1], p, b)
    assert p.weight_only.dense is None  # one sequence never makes the copy
    y = quantized_linear(x, p, b)
    deq = dequantize_weight(p)
    dense = p.weight_only.dense
    assert torch.equal(dense.to_dense() if dense.is_mkldnn else dense, deq.bfloat16())  # oneDNN's layout, same values
    ref = bf16_input_reference(x, deq.bfloat16(), b)
    assert (y - ref).abs().max() <= 2 ** -8 * ref.abs().max()
    single = torch.stack([quantized_linear(r[None], p, b)[0] for r in x])  # the int8/int4 kernel, row by row
    assert (y - single).abs().max() <= 2 ** -6 * single.abs().max()  # only the weights' bf16 rounding differs
    heads = quantized_linear(x[:, -1], p, b)  # (sequences, in), as the LM head sees the last positions
    assert torch.equal(heads, y[:, -1])


@pytest.mark.parametrize("mode", MODES)
def test_quantization_error_is_within_half_a_step(mode):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    if mode == "int8":
        q, scales = int8_quantize(w)
        step = scales.float()[:, None]
        deq = q.float() * step
    else:
        q, sz = int4_quantize(w)
        step = sz[..., 0].t().float().repeat_interleave(INT4_GROUP, dim=1)  # (out, in): each input's group scale
        deq = int4_dequantize_codes(q, sz)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert ((deq - w).abs() <= step * 0.5 + 1e-2 * step).all()  # bf16-rounded scales cost a hair over half a step


def tiny(tie: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(vocab_size=V, padded_vocab_size=112, block_size=64, n_layer=2, n_embd=64, n_head=4,
                       n_query_groups=2, tie_embeddings=tie)).eval()
    with torch.no_grad():  # larger random weights so greedy continuations are not all one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


class Bf16Rounded(torch.nn.Module):
    """A float linear that rounds its input and output to bfloat16 as the kernels do (fp32 product in between)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return bf16_input_reference(x, self.weight, None).bfloat16().float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tie", [False, True])
def test_greedy_equals_the_dequantized_weights_model(mode, tie):
    model = tiny(tie)
    emb = model.transformer.wte.weight.detach().clone()
    q = quantize_for_inference(copy.deepcopy(model), mode)
    swapped = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(swapped) == 2 * 5 + 1 and "lm_head" in swapped  # qkv, proj, fc_1, fc_2, proj per block; the head
    assert q.lm_head.weight.weight_only.mode == "int8"  # the head stays int8 under int4
    assert q.transformer.h[0].mlp.fc_1.weight.weight_only.mode == mode
    assert torch.equal(q.transformer.wte.weight, emb)  # a tied embedding keeps its float table
    assert all(not p.requires_grad for p in q.parameters())
    ref = dequantize_model(copy.deepcopy(q))  # plain fp32 linears holding exactly the weights the kernels use
    rounded = copy.deepcopy(ref)
    for name, m in list(rounded.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "lm_head":  # greedy picks score the int8 head in fp32
            parent, _, attr = name.rpartition(".")
            setattr(rounded.get_submodule(parent), attr, Bf16Rounded(m))
    prompt = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(2))
    got = list(generate_tokens(q, prompt, 40))
    assert got == list(generate_tokens(rounded, prompt, 40))
    assert len(set(got)) > 3, "degenerate continuation would make the comparison meaningless"
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    # left-padded batched decoding of the quantized model equals its own one-by-one decoding
    assert greedy_batch(q, prompts, 12, stop_ids=[]) == [list(generate_tokens(q, torch.tensor(p), 12)) for p in prompts]
    with torch.no_grad():
        x = prompt[None]
        # each product's input and output are rounded to bfloat16: a few percent after two layers of std-0.5 weights
        assert (q(x) - ref(x)).abs().max() <= 0.06 * ref(x).abs().max()


@pytest.mark.parametrize("bias", [False, True])
def test_screened_argmax_is_the_argmax_of_the_int8_head_in_fp32(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 64, generator=g)
    b = torch.randn(1024, generator=g) if bias else None
    weight = quantize_weight_only(w, "int8", torch.float32)
    add_screen(weight)
    assert weight.weight_only.screen is not None
    deq = dequantize_weight(weight)  # (out, in) fp32: the int8 codes times their scales
    packed, sz = weight.weight_only.screen
    coarse_differs = 0
    for B in (1, 3, DENSE_BATCH - 1):
        for _ in range(20):
            x = torch.randn(B, 64, generator=g) * 3
            exact = torch.nn.functional.linear(x, deq, b)  # (B, out)
            assert torch.equal(screened_argmax(x, weight, b), exact.argmax(-1))
            coarse = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, INT4_GROUP, sz).float()
            coarse_differs += int((coarse + (0 if b is None else b)).argmax(-1).ne(exact.argmax(-1)).sum())
    assert coarse_differs > 0, "the int4 copy alone always agreed: these cases would not catch a missing rescore"
    assert SCREEN_CANDIDATES < 1024


def test_greedy_tokens_screens_only_a_weight_only_head_with_few_rows(monkeypatch):
    q = quantize_for_inference(tiny(), "int4")
    head = q.lm_head
    st = head.weight.weight_only
    assert st.screen is not None and all(any(t is s for t in storage_tensors(head.weight)) for s in st.screen)
    x = torch.randn(DENSE_BATCH, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    with torch.no_grad():
        full = head(x).argmax(-1)
        # count the int4 kernel's calls: at an int8 head only the screen uses it
        monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu",
                            lambda *a: calls.append(a[0].shape) or real(*a))
        few = greedy_tokens(head, x[:3])
        many = greedy_tokens(head, x)
    assert calls == [torch.Size([3, 64])]  # DENSE_BATCH rows take the head's batched path, not the screen
    assert torch.equal(many, full)
    assert torch.equal(few, torch.nn.functional.linear(x[:3], dequantize_weight(head.weight)).argmax(-1))
    plain = tiny().lm_head  # a float head computes its logits
    assert torch.equal(greedy_tokens(plain, x), plain(x).argmax(-1))
    given = torch.randn(DENSE_BATCH, 112, generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy_tokens(plain, x, given), given.argmax(-1))  # logits the caller has are not recomputed
    odd = quantize_weight_only(torch.randn(112, 48), "int8", torch.float32)  # in % 32 != 0: no int4 copy
    add_screen(odd)
    assert odd.weight_only.screen is None


def test_lora_applies_unmerged_on_top_of_an_int8_base():
    torch.manual_seed(3)
    model = tiny()
    lora = LoRAArgs(r=4, alpha=8, dropout=0.0, targets="all")
    q = quantize_for_inference(copy.deepcopy(model), "int8")
    ref = dequantize_model(copy.deepcopy(q))
    for m in (q, ref):
        apply_method(m, "lora", lora)
    with torch.no_grad():  # the same non-zero update on both
        for (n, p), (_, r) in zip(q.named_parameters(), ref.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
                r.copy_(p)
    head = q.lm_head
    assert is_quantized(head.weight) and compute_dtype_of(head.weight) == torch.float32
    assert head.lora_A.dtype == torch.float32
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        got, want = q.eval()(x), ref.eval()(x)
        base = quantize_for_inference(copy.deepcopy(model), "int8")(x)
    assert (got - want).abs().max() <= 0.06 * want.abs().max()
    assert (got - base).abs().max() > 0.1 * want.abs().max()  # the update is really there


def test_shapes_the_kernels_refuse_stay_float_with_a_count():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=1, n_embd=40, n_head=4, n_query_groups=2)).eval()
    with pytest.warns(UserWarning, match=r"int4: \d+ layer\(s\) kept in float"):
        quantize_for_inference(model, "int4")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("qkv", "fc_1", "lm_head"))}
    assert set(kinds.values()) == {"Linear"}  # 40 inputs are not a multiple of the 32-wide int4 groups


def test_logical_numel_counts_the_float_weight():
    for mode in MODES:
        p = quantize_weight_only(torch.randn(32, 64), mode, torch.float32)
        assert logical_numel(p) == 32 * 64


def test_training_refuses_the_weight_only_modes_and_names_the_bnb_ones():
    for mode in MODES:
        with pytest.raises(ValueError, match=r"inference .*bnb\.nf4"):
            check_mode(mode)
        assert check_mode(mode, inference=True) == mode
    with pytest.raises(ValueError, match="int8, int4"):
        check_mode("int3", inference=True)


def test_finetune_cli_refuses_int8(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "lora", "--quantize", "int8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "weight-only quantization for inference" in err and "bnb.nf4-dq" in err


@pytest.mark.parametrize("mode", MODES)
def test_generate_command_decodes_with_the_weight_only_modes(mode, tiny_checkpoint, capsys):
    from leantune.commands.generate import generate
    from leantune.inference import load_for_inference

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "kept in float" warning: every layer of the tiny Llama fits
        text = generate(prompt="Hi", checkpoint_dir=tiny_checkpoint, max_new_tokens=6, quantize=mode, threads=1)
    assert isinstance(text, str) and "tokens/s" in capsys.readouterr().err
    model = load_for_inference(tiny_checkpoint, quantize=mode)[0]
    assert model.quantize == mode and isinstance(model.lm_head, QuantLinear)


@pytest.mark.slow
def test_default_model_still_answers_with_int8(default_checkpoint):
    """(int4 answers this one with "L'Étoile, la Marseillaise, ..."; its agreement is measured in bench/decode_cpu.py.)"""
    from leantune.decode.generate import encode_prompt
    from leantune.inference import load_for_inference

    model, tok, _, _ = load_for_inference(default_checkpoint, "32-true", quantize="int8")
    ids = torch.tensor(encode_prompt(tok, "What is the capital of France?"))
    text = tok.decode(list(generate_tokens(model, ids, 12, stop_ids=tok.eos_ids)), skip_special_tokens=True)
    assert "Paris" in text
    assert model.lm_head.weight.weight_only.mode == "int8"


@pytest.mark.parametrize("method", [m for m in EVERY_METHOD if m != "full"])
def test_every_adapter_method_applies_on_top_of_an_int8_base(method):
    """Each PEFT method, unmerged on the int8 base, computes what it computes on the dequantized float base."""
    model = tiny()
    q = quantize_for_inference(copy.deepcopy(model), "int8")
    ref = dequantize_model(copy.deepcopy(q))
    x = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base_err = (q(x) - ref(x)).abs().max()  # the kernels' bfloat16 rounding, before any adapter
    names = apply_method(q, method, tiny_args(method))
    assert names == apply_method(ref, method, tiny_args(method))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the same non-zero trained state on both
        qp, rp = dict(q.named_parameters()), dict(ref.named_parameters())
        for n in names:
            qp[n].add_(torch.randn(qp[n].shape, generator=g) * 0.05)
            rp[n].copy_(qp[n])
    with torch.no_grad():
        got, want = q.eval()(x), ref.eval()(x)
        base = quantize_for_inference(copy.deepcopy(model), "int8")(x)
    # the adapter adds no error of its own: what separates the two stays at the quantized base's own rounding level
    err = (got - want).abs().max()
    assert err <= 3 * base_err + 1e-3 * want.abs().max(), (float(err), float(base_err))
    assert not torch.equal(got, base)  # the adapter is applied
