"""bitsandbytes quantization of the frozen base (QLoRA) on CPU: the quantized forward equals the forward with the
dequantized weights, loading streams and quantizes exactly like in-memory quantization, a QLoRA step trains only
adapter tensors, and merging adds the update to the dequantized base."""

import warnings

import pytest
import torch

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.methods import apply_method, load_adapter, method_args_class, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import (
    QUANT_MODES,
    QuantLinear,
    dequantize_model,
    dequantize_weight,
    is_quantized,
    logical_numel,
    quantize_model,
    quantize_weight,
    quantized_nbytes,
    round_trip_,
    storage_tensors,
)
from leantune.peft.adapter import AdapterArgs
from leantune.peft.lora import LoRAArgs, LoRALinear, merge_lora
from leantune.train.loss import supervised_ce_sum

V = 101
# Max |quantized - float| logits over max |float logits| for this tiny random model: 4-bit blocks of 64 with
# absmax scales lose ~10% per weight, int8 row-wise well under 1%.
BOUND = {"bnb.nf4": 0.35, "bnb.nf4-dq": 0.35, "bnb.fp4": 0.5, "bnb.fp4-dq": 0.5, "bnb.int8": 0.03}


def tiny(seed: int = 0, bias: bool = True) -> GPT:
    torch.manual_seed(seed)
    cfg = Config(vocab_size=V, block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, bias=bias)
    return GPT(cfg).eval()


def idx(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(seed))


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_forward_equals_dequantized_weight_forward(mode):
    x = idx()
    with torch.no_grad():
        ref = tiny()(x)
        q = quantize_model(tiny(), mode, torch.float32)
        out_q = q(x)
        deq = dequantize_model(quantize_model(tiny(), mode, torch.float32))
        out_d = deq(x)
    # every block linear is quantized (5 per block: qkv, proj, fc_1, fc_2, mlp proj); embedding and head are not
    assert len(quant_layers(q)) == 10 and not quant_layers(deq)
    assert isinstance(q.lm_head, torch.nn.Linear) and q.quantize == mode
    # CPU bitsandbytes computes with the dequantized weight: equal up to float summation order
    torch.testing.assert_close(out_q, out_d, atol=1e-5, rtol=1e-5)
    rel = float((out_q - ref).abs().max() / ref.abs().max())
    assert 0 < rel < BOUND[mode], rel
    # storage: 4-bit packs two weights per byte; int8 one; the logical count is unchanged
    layer = q.transformer.h[0].mlp.fc_1
    assert logical_numel(layer.weight) == 64 * layer.out_features
    assert layer.weight.numel() * layer.weight.element_size() == 64 * layer.out_features // (1 if mode == "bnb.int8" else 2)


def test_nf4_reconstructs_normal_weights_better_than_fp4():
    """NF4's levels are normal quantiles: on Gaussian weights its error is lower than FP4's (QLoRA, Table 2)."""
    errors = {}
    for mode in ("bnb.nf4", "bnb.fp4"):
        model = tiny()
        w = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("mlp.fc_1")}
        quantize_model(model, mode, torch.float32)
        errors[mode] = sum(float((dequantize_weight(m.weight) - w[n]).pow(2).mean()) for n, m in quant_layers(model).items()
                           if n in w)
    assert errors["bnb.nf4"] < 0.8 * errors["bnb.fp4"], errors


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_loading_quantizes_each_tensor_exactly_like_in_memory(mode, tmp_path):
    model = tiny(bias=False)  # a Llama folder: no linear biases
    save_hf_checkpoint(model, tmp_path / "ckpt")
    loaded = load_hf_checkpoint(tmp_path / "ckpt", quantize=mode)
    expected = quantize_model(tiny(bias=False), mode, torch.float32)
    got, want = quant_layers(loaded), quant_layers(expected)
    assert got.keys() == want.keys() and len(got) == 10
    for n in got:
        assert torch.equal(got[n].weight.data, want[n].weight.data), n
        torch.testing.assert_close(dequantize_weight(got[n].weight), dequantize_weight(want[n].weight), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx()), expected(idx()), atol=0, rtol=0)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every stored tensor, quantized ones as their raw bytes plus their dequantized values (scales included)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if is_quantized(p):
            out[f"{n}.dequantized"] = dequantize_weight(p).clone()
    return out


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.fp4", "bnb.int8"])
@pytest.mark.parametrize("method", ["lora", "adapter", "adapter_v2"])
def test_qlora_step_changes_only_adapter_tensors(method, mode):
    model = quantize_model(tiny(), mode, torch.float32).train()
    args = LoRAArgs(r=4, dropout=0.0, targets="all") if method == "lora" else method_args_class(method)(start_layer=0)
    names = apply_method(model, method, args)
    if method == "lora":  # B = 0 at init would leave A without gradient
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_(0, 0.1)
    elif method in ("adapter", "adapter_v2"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("gating_factor"):
                    p.fill_(0.5)
    before = snapshot(model)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=0.1)
    x = idx()
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = supervised_ce_sum(model(x, return_hidden=True), model.lm_head, labels) / int((labels != -100).sum())
    loss.backward()
    for n in names:
        g = params[n].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    opt.step()
    after = snapshot(model)
    for n in before:
        if n in names:
            assert not torch.equal(before[n], after[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(before[n], after[n]), f"frozen {n} changed"
    assert sum(n.endswith(".dequantized") for n in before) == 10  # the quantized base was really checked


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_qlora_merge_is_dequantized_base_plus_BA(mode):
    model = quantize_model(tiny(), mode, torch.float32)
    apply_method(model, "lora", LoRAArgs(r=4, alpha=8, dropout=0.0, targets="all"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)
        unmerged = model(idx())
    layer = model.transformer.h[1].attn.qkv
    expected_w = dequantize_weight(layer.weight) + layer.delta_weight()
    with pytest.raises(ValueError, match="requantize"):
        layer.merge()
    merged = merge_lora(model)
    w = merged.transformer.h[1].attn.qkv.weight
    assert type(merged.transformer.h[1].attn.qkv) is torch.nn.Linear and w.dtype == torch.float32
    torch.testing.assert_close(w, expected_w, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx()), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_round_trip_gives_the_weights_a_quantized_base_computes_with(mode):
    rt = round_trip_(tiny(), mode, torch.float32)
    q = quantize_model(tiny(), mode, torch.float32)
    assert not quant_layers(rt)
    with torch.no_grad():
        torch.testing.assert_close(rt(idx()), q(idx()), atol=1e-5, rtol=1e-5)


def test_adapter_on_a_differently_quantized_base_warns(tmp_path):
    model = quantize_model(tiny(), "bnb.nf4", torch.float32)
    names = apply_method(model, "adapter", AdapterArgs(start_layer=0))
    manifest = {"method": "adapter", "method_args": {"prompt_length": 10, "start_layer": 0}, "quantize": "bnb.nf4"}
    save_checkpoint(tmp_path, model, "adapter", names, manifest, checkpoint_dir=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(quantize_model(tiny(), "bnb.nf4", torch.float32), tmp_path)  # same mode: silent
    with pytest.warns(UserWarning, match=r"quantized with bnb.nf4.*in full precision.*--quantize bnb.nf4"):
        load_adapter(tiny(), tmp_path)
    with pytest.warns(UserWarning, match=r"quantized with bnb.nf4.*quantized with bnb.int8"):
        load_adapter(quantize_model(tiny(), "bnb.int8", torch.float32), tmp_path)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="bnb.nf4-dq"):
        quantize_model(tiny(), "nf4", torch.float32)


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("shape", [(96, 64), (100, 37), (1536, 576)])  # 100 x 37: blocks of 64 do not divide it
def test_quantized_nbytes_is_what_bitsandbytes_stores(mode, shape):
    """`estimate` counts quantized weights with this formula: it must equal the bytes actually held."""
    q = quantize_weight(torch.randn(*shape), mode, "cpu", torch.float32)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in storage_tensors(q)}
    assert quantized_nbytes(*shape, mode) == sum(held.values())


def allocation_peak(fn) -> int:
    """Peak bytes of live CPU tensors allocated while `fn` runs, from the allocator's own running total (the
    profiler reports it with each allocation and free), less what was live before."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for n in nodes:
            if isinstance(n.extra_fields, _ExtraFields_Allocation) and n.extra_fields.device.type == "cpu":
                events.append((n.start_time_ns, n.extra_fields))
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort(key=lambda e: e[0])
    first = events[0][1]
    return max(e.total_allocated for _, e in events) - (first.total_allocated - first.alloc_size)


def test_quantized_loading_never_holds_the_float_model(tmp_path):
    """Each block linear is quantized as it streams in: the load's peak is the quantized model plus one layer,
    far below loading in float (which a load-everything-then-quantize path would exceed)."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=512, block_size=64, n_layer=4, n_embd=256, n_head=4, n_query_groups=2,
                 intermediate_size=704)
    save_hf_checkpoint(GPT(cfg), tmp_path / "ckpt")
    holder = {}
    float_peak = allocation_peak(lambda: holder.update(f=load_hf_checkpoint(tmp_path / "ckpt")))
    float_bytes = sum(p.numel() * p.element_size() for p in holder["f"].parameters())
    quant_peak = allocation_peak(lambda: holder.update(q=load_hf_checkpoint(tmp_path / "ckpt", quantize="bnb.nf4")))
    quant_bytes = sum(t.untyped_storage().nbytes() for p in holder["q"].parameters() for t in storage_tensors(p))
    largest_layer = 4 * max(p.numel() for n, p in holder["f"].named_parameters() if ".h." in n)
    assert float_peak >= float_bytes
    # the quantized model plus one layer in flight (its float copy and bitsandbytes' working buffers: < 3x)
    assert quant_peak < quant_bytes + 3 * largest_layer, (quant_peak, quant_bytes, largest_layer)
    assert quant_peak < 0.5 * float_peak
