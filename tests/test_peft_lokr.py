"""LoKr against peft's implementation: peft's factorisation and factor shapes, same weights -> same logits (both
ways through PEFT's folder format), one AdamW step -> the same update, trainable counts equal to peft's (and
estimate's), merge == unmerged and loads in transformers, a quantized base, and the fused-qkv refusals."""

import json

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
from peft.tuners.lokr.layer import factorization as peft_factorization
from tiny_families import V, make_hf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.estimate import estimate
from leantune.methods import get_method, load_any_adapter
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import dequantize_weight, quantize_model
from leantune.peft.lokr import LoKrArgs, LoKrFactors, apply_lokr, factorization, lokr_params, merge_lokr
from leantune.peft.lycoris import LycorisLinear

METHOD = get_method("lokr")


def test_factorization_and_factor_shapes_are_peft_s():
    assert all(factorization(d, f) == peft_factorization(d, f) for d in range(1, 1200) for f in (-1, 1, 3, 4, 8))
    full = LoKrFactors(576, 576, 8, False, -1, {})  # 576 = 24 * 24: r 8 < 24 / 2 -> low-rank w2
    assert {n: tuple(p.shape) for n, p in full.named_parameters()} == {
        "lokr_w1": (24, 24), "lokr_w2_a": (24, 8), "lokr_w2_b": (8, 24)}
    both = LoKrFactors(192, 576, 4, True, -1, {})  # 192 = 12 * 16
    assert {n: tuple(p.shape) for n, p in both.named_parameters()} == {
        "lokr_w1_a": (12, 4), "lokr_w1_b": (4, 24), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 24)}
    assert torch.equal(full.delta(1.0), torch.zeros(576, 576))  # w1 starts at zero, as in peft


@pytest.mark.parametrize("name,args", [
    ("llama-gqa", dict(r=4, alpha=8, targets="all")),
    ("llama-gqa", dict(r=2, alpha=3, decompose_both=True, decompose_factor=4, targets=["query", "key", "mlp"])),
    ("qwen2-qkv-bias", dict(r=8, targets=["key", "value", "projection", "head"])),
    ("pythia-partial-rotary", dict(r=2, targets=["projection", "mlp", "head"])),  # fused qkv left out
])
def test_export_loads_in_peft_with_same_logits(tmp_path, name, args):
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = LoKrArgs(**args)
    apply_lokr(ours, args)
    randomize(lokr_params(ours))
    x = idx()
    with torch.no_grad():
        expected = ours(x)
    out = METHOD.peft.export(ours, tmp_path / "peft", str(base), args)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR" and cfg["decompose_both"] == args.decompose_both
    with torch.no_grad():
        actual = peft_from_folder(base, out).eval()(x).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,target_modules,kw", [
    ("llama-gqa", ["q_proj", "v_proj", "o_proj", "up_proj", "lm_head"], dict(decompose_both=True)),
    ("phi-2", ["q_proj", "k_proj", "dense", "fc2"], dict(decompose_factor=8)),
    ("falcon-40b-gqa", ["dense", "dense_h_to_4h"], {}),
])
def test_peft_folder_loads_with_same_logits(tmp_path, name, target_modules, kw):
    base = make_hf(name, tmp_path)
    pm, folder = make_peft(base, tmp_path / "peft", peft.LoKrConfig(r=2, alpha=5, target_modules=target_modules, **kw))
    x = idx()
    with torch.no_grad():
        expected = pm(x).logits
    ours = load_hf_checkpoint(base).eval()
    manifest = load_any_adapter(ours, folder)
    assert manifest["method"] == "lokr" and manifest["method_args"]["alpha"] == 5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_one_adamw_step_equals_peft(tmp_path):
    base = make_hf("qwen2-qkv-bias", tmp_path)
    ours = load_hf_checkpoint(base)
    args = LoKrArgs(r=2, alpha=4, decompose_both=True, targets=["query", "value", "mlp", "head"])
    apply_lokr(ours, args)
    randomize(lokr_params(ours))
    METHOD.peft.export(ours, tmp_path / "start", str(base), args)
    pm = peft_from_folder(base, tmp_path / "start", trainable=True)
    x = idx(1)
    adamw_step(lokr_params(ours), loss_ours(ours, x))
    adamw_step([p for p in pm.parameters() if p.requires_grad], loss_peft(pm, x))
    METHOD.peft.export(ours, tmp_path / "after", str(base), args)
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if ".base_layer." not in k}
    mine, start = peft_tensors(tmp_path / "after"), peft_tensors(tmp_path / "start")
    assert set(mine) == set(theirs) and len(mine) > 20
    for k in mine:
        assert not torch.equal(mine[k], start[k]), k
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,targets,modules,kw", [
    ("llama-gqa", "all", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
     dict(r=2, decompose_both=True)),
    ("phi-2", ["query", "value", "mlp"], ["q_proj", "v_proj", "fc1", "fc2"], dict(r=8)),
    ("pythia-partial-rotary", ["projection", "mlp"], ["dense", "dense_h_to_4h", "dense_4h_to_h"], dict(r=4)),
])
def test_trainable_count_equals_peft_and_estimate(tmp_path, name, targets, modules, kw):
    base = make_hf(name, tmp_path)
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), peft.LoKrConfig(target_modules=modules, **kw))
    expected = pm.get_nb_trainable_parameters()[0]
    ours = load_hf_checkpoint(base)
    names = apply_lokr(ours, LoKrArgs(targets=targets, **kw))
    assert sum(p.numel() for n, p in ours.named_parameters() if n in names) == expected
    counts = estimate(ours.config, "lokr", LoKrArgs(targets=targets, **kw), "32-true")
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
    apply_lokr(model, LoKrArgs(r=2, targets=["query", "value", "projection", "mlp", "head"]))
    randomize(lokr_params(model), std=0.2)
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
    merge_lokr(model)
    assert not any(isinstance(m, LycorisLinear) for m in model.modules()) and not model.config.tie_embeddings
    save_hf_checkpoint(model, tmp_path / "merged", source_dir=tmp_path / "base")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=0)


def test_quantized_base_trains_and_merges_into_the_dequantized_weight():
    model = quantize_model(tiny(), "bnb.nf4-dq", torch.float32)
    names = apply_lokr(model, LoKrArgs(r=2, targets="all"))
    randomize(lokr_params(model), std=0.2)
    layer = model.transformer.h[1].mlp.fc_1
    expected_w = dequantize_weight(layer.weight) + layer.delta_weight()
    with torch.no_grad():
        unmerged = model(idx())
    loss_ours(model.train(), idx()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n in names}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    merged = merge_lokr(model.eval())
    torch.testing.assert_close(merged.transformer.h[1].mlp.fc_1.weight, expected_w, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx()), unmerged, atol=1e-5, rtol=1e-5)


def test_rank_and_module_dropout_are_training_only():
    model = tiny()
    apply_lokr(model, LoKrArgs(r=2, targets=["mlp"], rank_dropout=0.5, module_dropout=0.5))
    randomize(lokr_params(model), std=0.2)
    layer = model.transformer.h[0].mlp.fc_1
    full = layer.delta_weight()
    torch.testing.assert_close(layer.delta_weight(training=False), full)
    torch.manual_seed(3)
    seen = [layer.delta_weight(training=True) for _ in range(20)]
    assert any(d is None for d in seen)  # module dropout skipped the layer
    kept = [d for d in seen if d is not None]
    assert kept and all(((d == 0).all(1) | (d == full).all(1)).all() for d in kept)  # whole rows dropped, unscaled
    assert any((d == 0).all(1).any() for d in kept)


def test_flags_and_fused_qkv_refusals(tmp_path):
    for bad, flag in ((dict(r=0), "--lokr.r"), (dict(decompose_factor=0), "--lokr.decompose_factor"),
                      (dict(module_dropout=-0.1), "--lokr.module_dropout")):
        with pytest.raises(ValueError, match=flag):
            LoKrArgs(**bad)
    base = make_hf("pythia-partial-rotary", tmp_path)
    ours = load_hf_checkpoint(base)
    apply_lokr(ours, LoKrArgs(r=2, targets=["query", "mlp"]))
    with pytest.raises(ValueError, match="fuses q/k/v.*--lokr.targets"):
        METHOD.peft.export(ours, tmp_path / "out", str(base), LoKrArgs(r=2, targets=["query", "mlp"]))
    _, folder = make_peft(base, tmp_path / "peft", peft.LoKrConfig(r=2, target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="query_key_value has no exact leantune equivalent"):
        load_any_adapter(load_hf_checkpoint(base), folder)
