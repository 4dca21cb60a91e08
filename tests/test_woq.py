"""Weight-only int8 / int4 decoding (`--quantize int8|int4`): torch's CPU kernels against the dequantized fp32
weights, greedy decoding against the dequantized-weights model, adapters on top, and the commands' flags."""

import copy
import warnings

import pytest
import torch
from method_cases import EVERY_METHOD, tiny_args

from leantune.cli import main
from leantune.decode.compile import compile_unavailable_reason
from leantune.decode.gemv import GEMV_ROWS
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
needs_inductor = pytest.mark.skipif(compile_unavailable_reason() is not None, reason="inductor cannot compile here")
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


@needs_inductor
@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1])
def test_compiled_int8_steps_of_few_rows_multiply_in_fp32(rows):
    """Under torch.compile, int8 calls of up to GEMV_ROWS rows are inductor's reductions over the fp32 activations:
    equal to the dequantized fp32 product up to summation order, where the eager kernel's bfloat16 rounding of
    activations and outputs misses by ~2^-9 relative. More rows keep the kernel."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    p = quantize_weight_only(w, "int8", torch.float32)
    x = torch.randn(rows, 96, generator=g)
    ref = torch.nn.functional.linear(x, dequantize_weight(p), b)
    compiled = torch.compile(quantized_linear, fullgraph=True, dynamic=False)(x, p, b)
    eager = quantized_linear(x, p, b)
    fp32_error, eager_error = (compiled - ref).abs().max(), (eager - ref).abs().max()
    if rows <= GEMV_ROWS:
        assert fp32_error <= 1e-5 * ref.abs().max() < eager_error, (fp32_error, eager_error)
    else:
        assert fp32_error > 1e-5 * ref.abs().max()  # the bfloat16 kernel, as eager
        assert (compiled - eager).abs().max() <= 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_many_rows_use_a_bf16_copy_of_the_same_weights(mode):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    p = quantize_weight_only(w, mode, torch.float32)
    x = torch.randn(DENSE_BATCH, 3, 96, generator=g)  # DENSE_BATCH sequences: the dense GEMM path
    quantized_linear(x[:1, :DENSE_BATCH - 1], p, b)
    quantized_linear(x[:DENSE_BATCH - 1, :1], p, b)
    assert p.weight_only.dense is None  # fewer rows (one-token steps, short prompts) never make the copy
    y = quantized_linear(x, p, b)
    deq = dequantize_weight(p)
    dense = p.weight_only.dense
    dense = dense.to_dense() if dense.is_mkldnn else dense  # oneDNN's layout, same values
    # int8: the codes themselves (exact in bfloat16; scales after the product); int4: the weights rounded to bf16
    assert torch.equal(dense, p.data.bfloat16() if mode == "int8" else deq.bfloat16())
    ref = bf16_input_reference(x, deq if mode == "int8" else deq.bfloat16(), b)
    assert (y - ref).abs().max() <= 2 ** -8 * ref.abs().max()
    single = torch.stack([quantized_linear(r[None], p, b)[0] for r in x])  # the int8/int4 kernel, row by row
    assert (y - single).abs().max() <= 2 ** -6 * single.abs().max()  # only bf16 roundings differ
    heads = quantized_linear(x[:, -1], p, b)  # (sequences, in), as the LM head sees the last positions
    assert torch.equal(heads, y[:, -1])
    prompt = quantized_linear(x.reshape(1, -1, 96), p, b)  # one sequence, DENSE_BATCH * 3 positions: a prompt
    assert torch.equal(prompt, y.reshape(1, -1, 48))


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


def tiny(tie: bool = False, seed: int = 0, std: float = 0.5) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(vocab_size=V, padded_vocab_size=112, block_size=64, n_layer=2, n_embd=64, n_head=4,
                       n_query_groups=2, tie_embeddings=tie)).eval()
    with torch.no_grad():  # larger random weights so greedy continuations are not all one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def dequantized_reference(q: GPT) -> GPT:
    """Plain fp32 linears holding exactly the weights the kernels use; a tied head scores with the float table, as
    the quantized head's greedy picks do (`add_screen` exact_rows)."""
    ref = dequantize_model(copy.deepcopy(q))
    if q.lm_head.weight.weight_only.exact_rows is not None:
        ref.lm_head.weight = ref.transformer.wte.weight
    return ref


PROMPTS = [[5], [8, 9, 10, 11, 12], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], list(range(20, 43))]
"""Prompts of 1-5 positions run the int8/int4 kernels; 14 and 23 (>= DENSE_BATCH) run the dense prefill copy."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tie", [False, True])
def test_greedy_follows_the_dequantized_fp32_reference(mode, tie):
    """Every greedy pick is the fp32 reference's argmax on the same history, up to the kernels' bfloat16 activation
    rounding: a pick other than the argmax must be within rounding of it (a near tie; a tiny random model meets a
    few in 32 tokens, after which the continuations part) and nearly all picks are the argmax itself."""
    model = tiny(tie, std=0.2)  # std 0.5 amplifies bf16 rounding to ~8% of the logits within 32 tokens
    emb = model.transformer.wte.weight.detach().clone()
    q = quantize_for_inference(copy.deepcopy(model), mode)
    swapped = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(swapped) == 2 * 5 + 1 and "lm_head" in swapped  # qkv, proj, fc_1, fc_2, proj per block; the head
    assert q.lm_head.weight.weight_only.mode == "int8"  # the head stays int8 under int4
    assert q.transformer.h[0].mlp.fc_1.weight.weight_only.mode == mode
    assert torch.equal(q.transformer.wte.weight, emb)  # a tied embedding keeps its float table
    assert (q.lm_head.weight.weight_only.exact_rows is q.transformer.wte.weight) == tie
    assert all(not p.requires_grad for p in q.parameters())
    ref = dequantized_reference(q)
    got = [list(generate_tokens(q, torch.tensor(p), 32)) for p in PROMPTS]
    assert all(len(set(g)) > 3 for g in got), "degenerate continuations would make the comparison meaningless"
    assert q.transformer.h[0].mlp.fc_1.weight.weight_only.dense is not None  # the long prompts took the dense copy
    # left-padded batched decoding (its prompts' 18 rows take the dense copy) follows the reference as well
    short = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    batched = greedy_batch(q, short, 12, stop_ids=[])
    exact = sum(picks_follow(ref, p, g) for p, g in [*zip(PROMPTS, got), *zip(short, batched)])
    assert exact >= 0.9 * (32 * len(PROMPTS) + 12 * len(short)), exact  # measured 117-127 of 128 single-stream


@needs_inductor
@pytest.mark.parametrize("mode", MODES)
def test_compiled_greedy_follows_the_dequantized_fp32_reference(mode):
    """The compiled decode step (`--compile`: fp32 int8 products, or int4's tinygemm kernel, for one sequence and for
    a batch of three, the prompts' forward eager) picks the reference's argmax, or a near tie of it, as the eager
    kernels do."""
    q = quantize_for_inference(tiny(True, std=0.2), mode)
    ref = dequantized_reference(q)
    got = [list(generate_tokens(q, torch.tensor(p), 32, compiled=True)) for p in PROMPTS]
    short = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    batched = greedy_batch(q, short, 12, stop_ids=[], compiled=True)
    assert all(len(set(g)) > 3 for g in got)
    exact = sum(picks_follow(ref, p, g) for p, g in [*zip(PROMPTS, got), *zip(short, batched)])
    assert exact >= (0.95 if mode == "int8" else 0.9) * (32 * len(PROMPTS) + 12 * len(short)), exact


def picks_follow(ref: GPT, prompt: list[int], got: list[int]) -> int:
    """Check each greedy pick against the reference's logits on the same history; -> how many were its argmax."""
    with torch.no_grad():
        logits = ref(torch.tensor(prompt + got)[None])[0, len(prompt) - 1:-1]  # (new, vocab): the logits of each pick
    best, picked = logits.max(-1).values, logits.gather(-1, torch.tensor(got)[:, None])[:, 0]
    # measured up to 1.4% on these models; an int8 head scored from its int8 rows instead of the tied float table,
    # or a wrong weight, misses by more
    assert ((best - picked) <= 0.03 * logits.abs().max()).all(), (prompt, (best - picked).max())
    return int(logits.argmax(-1).eq(torch.tensor(got)).sum())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [3, 2 * DENSE_BATCH])
def test_logits_are_within_the_activation_rounding_of_the_fp32_reference(mode, rows):
    """Kernel path (3 positions) and dense prefill path (16): only bfloat16 activation/output rounding separates
    the logits from the dequantized fp32 model's (int8 codes and scales are exact in both paths)."""
    q = quantize_for_inference(tiny(seed=1, std=0.2), mode)
    ref = dequantized_reference(q)
    x = torch.randint(0, V, (1, rows), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = q(x), ref(x)
    # each product rounds its input and output to bfloat16 (2^-9 relative): measured 0.6-4.7% of the largest logit
    # after two layers of std-0.2/0.3 weights
    assert (got - want).abs().max() <= 0.06 * want.abs().max(), float((got - want).abs().max() / want.abs().max())


def test_tied_head_greedy_picks_are_the_float_heads():
    """A tied head's screened candidates are scored from the float embedding: its greedy pick is the float argmax,
    which the int8 head's own argmax is not always (the case the old int8 rescoring got wrong)."""
    q = quantize_for_inference(tiny(tie=True), "int8")
    head = q.lm_head
    table = q.transformer.wte.weight
    g = torch.Generator().manual_seed(7)
    int8_wrong = 0
    for _ in range(200):
        x = torch.randn(3, 64, generator=g)
        want = torch.nn.functional.linear(x, table).argmax(-1)
        assert torch.equal(greedy_tokens(head, x), want)
        int8_wrong += int(torch.nn.functional.linear(x, dequantize_weight(head.weight)).argmax(-1).ne(want).sum())
    assert int8_wrong > 0, "the int8 head always agreed: these cases would not catch scoring from its int8 rows"


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
    model = tiny(std=0.2)  # std 0.5 amplifies the bf16 rounding of 22-row (dense copy) products unevenly
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
