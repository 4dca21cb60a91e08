"""LoHa against peft's implementation: same weights -> same logits (both ways through PEFT's folder format, on
split- and fused-qkv families), one AdamW step -> the same update, trainable counts equal to peft's (and estimate's),
merge == unmerged and loads in transformers, a quantized base, and LoRA + LoHa + LoKr merged together."""

import json
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers as tf
from lycoris_support import (
    adamw_step,
    idx,
    loss_ours,
    loss_peft,
    make_peft,
    peft_from_folder,
    peft_tensors,
    randomize,
)
from tiny_families import V, make_hf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.estimate import estimate
from leantune.merge import merge_adapters
from leantune.methods import build_manifest, get_method, load_any_adapter, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import dequantize_weight, quantize_model
from leantune.peft.loha import LoHaArgs, apply_loha, loha_params, merge_loha
from leantune.peft.lokr import LoKrArgs, apply_lokr
from leantune.peft.lora import LoRAArgs, LoRALinear, apply_lora
from leantune.peft.lycoris import LycorisLinear

METHOD = get_method("loha")


@pytest.mark.parametrize("name,targets", [
    ("llama-gqa", "all"),
    ("qwen2-qkv-bias", ["key", "value", "mlp", "head"]),
    ("pythia-partial-rotary", ["query", "key", "value", "projection"]),  # fused grouped qkv: one rank-3r LoHa
    ("falcon-40b-gqa", ["value", "mlp"]),  # a partial fused qkv: zero rows for q and k
])
def test_export_loads_in_peft_with_same_logits(tmp_path, name, targets):
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = LoHaArgs(r=4, alpha=8, targets=targets)
    apply_loha(ours, args)
    randomize(loha_params(ours))
    x = idx()
    with torch.no_grad():
        expected = ours(x)
    out = METHOD.peft.export(ours, tmp_path / "peft", str(base), args)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["r"] == 4 and cfg["alpha"] == 8
    with torch.no_grad():
        actual = peft_from_folder(base, out).eval()(x).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,target_modules", [
    ("llama-gqa", ["q_proj", "v_proj", "o_proj", "up_proj", "lm_head"]),
    ("phi-2", ["q_proj", "k_proj", "dense", "fc2"]),
    ("pythia-partial-rotary", ["query_key_value", "dense_h_to_4h"]),  # one peft LoHa over the fused qkv
])
def test_peft_folder_loads_with_same_logits(tmp_path, name, target_modules):
    base = make_hf(name, tmp_path)
    pm, folder = make_peft(base, tmp_path / "peft", peft.LoHaConfig(r=4, alpha=6, target_modules=target_modules))
    x = idx()
    with torch.no_grad():
        expected = pm(x).logits
    ours = load_hf_checkpoint(base).eval()
    manifest = load_any_adapter(ours, folder)
    assert manifest["method"] == "loha" and manifest["method_args"]["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_one_adamw_step_equals_peft(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    ours = load_hf_checkpoint(base)
    args = LoHaArgs(r=4, alpha=8, targets=["query", "key", "mlp", "head"])
    apply_loha(ours, args)
    randomize(loha_params(ours))
    METHOD.peft.export(ours, tmp_path / "start", str(base), args)
    pm = peft_from_folder(base, tmp_path / "start", trainable=True)
    x = idx(1)
    adamw_step(loha_params(ours), loss_ours(ours, x))
    adamw_step([p for p in pm.parameters() if p.requires_grad], loss_peft(pm, x))
    METHOD.peft.export(ours, tmp_path / "after", str(base), args)
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if ".base_layer." not in k}
    mine = peft_tensors(tmp_path / "after")
    start = peft_tensors(tmp_path / "start")
    assert set(mine) == set(theirs) and len(mine) == 4 * (2 * 5 + 1)  # 4 tensors: q, k, 3 mlp per layer, head
    for k in mine:
        assert not torch.equal(mine[k], start[k]), k
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,targets,modules", [
    ("llama-gqa", "all", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    ("phi-2", ["query", "value", "mlp"], ["q_proj", "v_proj", "fc1", "fc2"]),
])
def test_trainable_count_equals_peft_and_estimate(tmp_path, name, targets, modules):
    base = make_hf(name, tmp_path)
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), peft.LoHaConfig(r=4, target_modules=modules))
    expected = pm.get_nb_trainable_parameters()[0]
    ours = load_hf_checkpoint(base)
    names = apply_loha(ours, LoHaArgs(r=4, targets=targets))
    assert sum(p.numel() for n, p in ours.named_parameters() if n in names) == expected
    counts = estimate(load_hf_checkpoint(base).config, "loha", LoHaArgs(r=4, targets=targets), "32-true")
    assert counts["trainable_params"] == expected


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(Config(vocab_size=V, block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, **kw)).eval()


def test_merge_equals_unmerged_unmerge_restores_and_folder_loads_in_transformers(tmp_path):
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    model = load_hf_checkpoint(tmp_path / "base").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_loha(model, LoHaArgs(r=4, alpha=8, targets=["key", "value", "mlp", "head"]))
    randomize(loha_params(model), std=0.2)
    x = idx()
    # in place on every layer but the head: the head's weight is the embedding's (merge_* unties it first)
    layers = [m for n, m in model.named_modules() if isinstance(m, LycorisLinear) and n != "lm_head"]
    with torch.no_grad():
        expected = model(x)
        for m in layers:
            m.merge()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        for m in layers:
            m.unmerge()
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    merge_loha(model)
    assert not any(isinstance(m, LycorisLinear) for m in model.modules()) and not model.config.tie_embeddings
    save_hf_checkpoint(model, tmp_path / "merged", source_dir=tmp_path / "base")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_base_trains_and_merges_into_the_dequantized_weight(mode):
    model = quantize_model(tiny(), mode, torch.float32)
    names = apply_loha(model, LoHaArgs(r=4, targets="all"))
    randomize(loha_params(model), std=0.2)
    layer = model.transformer.h[0].attn.qkv
    expected_w = dequantize_weight(layer.weight) + layer.delta_weight()
    with torch.no_grad():
        unmerged = model(idx())
    loss_ours(model.train(), idx()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n in names}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    with pytest.raises(ValueError, match="requantize"):
        layer.merge()
    merged = merge_loha(model.eval())
    torch.testing.assert_close(merged.transformer.h[0].attn.qkv.weight, expected_w, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx()), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_loha_lokr_merged_with_weights_equal_their_weighted_deltas(tmp_path):
    base_dir = tmp_path / "base"
    save_hf_checkpoint(tiny(), base_dir)
    tok = SimpleNamespace(bos_id=None, eos_ids=[0], pad_id=None)
    runs = [("lora", LoRAArgs(r=4, dropout=0.0, targets="all"), apply_lora, 0.5),
            ("loha", LoHaArgs(r=4, targets=["query", "value", "mlp"]), apply_loha, 1.0),
            ("lokr", LoKrArgs(r=2, targets=["key", "projection", "head"]), apply_lokr, -0.7)]
    expected = {k: v.clone() for k, v in load_hf_checkpoint(base_dir).state_dict().items()}
    folders = []
    for i, (name, args, apply, w) in enumerate(runs):
        model = load_hf_checkpoint(base_dir)
        trainable = apply(model, args)
        randomize([p for n, p in model.named_parameters() if n in trainable], std=0.2, seed=i)
        for mod_name, m in model.named_modules():
            if isinstance(m, (LoRALinear, LycorisLinear)):
                expected[f"{mod_name}.weight"] += w * m.delta_weight().detach()
        save_checkpoint(tmp_path / name, model, name, trainable,
                        build_manifest(name, args, base_dir, tok, None, "32-true", model=model), base_dir)
        folders.append(tmp_path / name)
    merged = merge_adapters(load_hf_checkpoint(base_dir), folders, [w for *_, w in runs], checkpoint_dir=base_dir)
    assert not any(isinstance(m, (LoRALinear, LycorisLinear)) for m in merged.modules())
    sd = merged.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(sd[k], v, atol=1e-5, rtol=0, msg=k)


def test_flags_and_refusals(tmp_path):
    assert LoHaArgs(targets="all").targets == ["query", "key", "value", "projection", "mlp", "head"]
    for bad, flag in ((dict(r=0), "--loha.r"), (dict(targets="qkv"), "--loha.targets"),
                      (dict(rank_dropout=1.0), "--loha.rank_dropout"), (dict(alpha=float("nan")), "--loha.alpha")):
        with pytest.raises(ValueError, match=flag):
            LoHaArgs(**bad)
    base = make_hf("gpt2", tmp_path)  # peft's LoHa does not wrap transformers' Conv1D
    ours = load_hf_checkpoint(base)
    apply_loha(ours, LoHaArgs(r=2))
    with pytest.raises(ValueError, match="Conv1D"):
        METHOD.peft.export(ours, tmp_path / "peft", str(base), LoHaArgs(r=2))


@pytest.mark.parametrize("dtype,linears", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_fp32_adds_the_update_to_the_weight_and_half_precision_keeps_it_apart(monkeypatch, dtype, linears):
    """fp32: one matmul with W + dW (a second product over every token costs more than the out x in add); bf16: the
    base and the update are two products, since W + dW in bf16 would round a small update away."""
    torch.manual_seed(0)
    model = tiny().to(dtype)
    apply_loha(model, LoHaArgs(r=4, targets="all"))
    layer = model.transformer.h[0].mlp.proj
    with torch.no_grad():
        for p in layer.factors[0].parameters():
            p.copy_(torch.randn_like(p) * 0.05)  # a small update: |dW| ~ 1e-4 of |W|
    x = torch.randn(3, 5, layer.in_features, dtype=dtype)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == linears
    monkeypatch.undo()
    dw = layer.delta_weight()
    with torch.no_grad():
        base = linear(x, layer.weight, layer.bias)
        expected = base.float() + linear(x.float(), dw.float())
        torch.testing.assert_close(y.float(), expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
        assert not torch.equal(y, base)  # the update reached the output
