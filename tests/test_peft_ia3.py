"""IA3 against peft's implementation: trainable counts (also via estimate), logits of exported and imported folders
on tiny random models of five families (split and fused qkv), one optimizer step, merge/unmerge, a merged folder in
transformers, a quantized base, and the commands end to end."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from method_cases import tiny_args
from peft.utils import get_peft_model_state_dict
from tiny_families import TINY, V, load_hf, make_hf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.checkpoint.peft_dir import peft_weights
from leantune.commands.export import export as export_command
from leantune.data import JSON
from leantune.estimate import estimate, resolve_config
from leantune.finetune import finetune
from leantune.methods import load_any_adapter
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import config_from_hf
from leantune.models.decoder.model import GPT
from leantune.models.quantize import dequantize_model, quantize_model
from leantune.peft.ia3 import METHOD, IA3Args, IA3Linear, apply_ia3, merge_ia3
from leantune.peft.peft_format import IA3
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs

export_peft, import_peft = IA3.export, IA3.load


def randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.copy_(1 + 0.5 * torch.randn_like(m.ia3_l))


def make_peft(base, tmp_path, **kw):
    """A folder made by the real peft library, vectors randomised away from ones."""
    pm = peft.get_peft_model(load_hf(base), peft.IA3Config(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    pm.eval().save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


# ours <-> peft's defaults for the family (peft's TRANSFORMERS_MODELS_TO_IA3_*_MAPPING)
@pytest.mark.parametrize("name,ours", [
    ("llama-gqa", IA3Args()),  # k_proj, v_proj, down_proj (feedforward)
    ("qwen2-qkv-bias", IA3Args(targets="query,value,mlp")),  # q_proj, v_proj, down_proj
    ("pythia-partial-rotary", IA3Args(targets="query,key,value,mlp")),  # the fused query_key_value, dense_4h_to_h
])
def test_trainable_count_equals_peft_and_estimate(name, ours):
    hf_cfg = TINY[name]()
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_config(hf_cfg), peft.IA3Config(task_type="CAUSAL_LM"))
    expected, _ = pm.get_nb_trainable_parameters()
    config = config_from_hf(hf_cfg.to_dict())
    assert estimate(config, "ia3", ours, "32-true")["trainable_params"] == expected
    with torch.device("meta"):
        model = GPT(config)
    names = apply_ia3(model, ours)
    assert sum(dict(model.named_parameters())[n].numel() for n in names) == expected


def test_default_model_count_equals_peft(default_checkpoint):
    """SmolLM2-135M with the defaults: 30 layers x (k 192 + v 192 + down-projection input 1536) = 57,600."""
    with torch.device("meta"):
        hf = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(default_checkpoint))
    expected, _ = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM")).get_nb_trainable_parameters()
    assert estimate(resolve_config(str(default_checkpoint)), "ia3", None, "32-true")["trainable_params"] == expected
    assert expected == 57_600


@pytest.mark.parametrize("name,targets,feedforward", [
    ("llama-gqa", "key,value,mlp", "mlp"),
    ("qwen2-qkv-bias", "all", "projection"),  # qkv bias scaled with the output; o_proj scaled on its input
    ("pythia-partial-rotary", "key,value,mlp", "mlp"),  # q rows of the fused module written as ones
    ("falcon-7b-mqa", "query,value,projection", "none"),
    ("gpt2", "key,projection,mlp", "mlp"),  # Conv1D: fan_in_fan_out
    ("phi-2", "query,value,mlp", "mlp"),
])
def test_export_loads_in_peft_with_same_logits(tmp_path, name, targets, feedforward):
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = IA3Args(targets=targets, feedforward=feedforward)
    apply_ia3(ours, args)
    randomize(ours)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["fan_in_fan_out"] == (name == "gpt2")
    assert set(cfg["feedforward_modules"]) <= set(cfg["target_modules"])
    assert all(k.endswith(".ia3_l") for k in peft_weights(out))
    pm = peft.PeftModel.from_pretrained(load_hf(base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, expected, atol=1e-5, rtol=0)
    back = load_hf_checkpoint(base).eval()
    import_peft(back, out)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,kw,targets", [
    ("llama-gqa", {}, ["key", "value", "mlp"]),
    ("llama-gqa", dict(target_modules=["q_proj", "o_proj", "down_proj"], feedforward_modules=["o_proj"]),
     ["query", "projection", "mlp"]),  # o_proj input-scaled, down_proj output-scaled
    ("phi-2", {}, ["query", "value", "mlp"]),
    ("pythia-partial-rotary", {}, ["query", "key", "value", "mlp"]),
    ("falcon-40b-gqa", {}, ["query", "key", "value", "mlp"]),
    ("gpt2", dict(fan_in_fan_out=True), ["query", "key", "value", "mlp"]),
])
def test_peft_folder_imports_with_same_logits(tmp_path, name, kw, targets):
    base = make_hf(name, tmp_path)
    pm, adapter = make_peft(base, tmp_path, **kw)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = pm(idx).logits
    manifest = load_any_adapter(ours := load_hf_checkpoint(base).eval(), adapter)  # dispatches on the folder type
    assert manifest["method"] == "ia3" and manifest["method_args"]["targets"] == targets
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)


def test_one_optimizer_step_equals_peft(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    pm, adapter = make_peft(base, tmp_path)
    pm = peft.PeftModel.from_pretrained(load_hf(base), adapter, is_trainable=True)
    ours = load_hf_checkpoint(base)
    import_peft(ours, adapter)
    idx, labels = torch.randint(0, V, (2, 16)), torch.randint(0, V, (32,))
    for model, logits in ((pm, lambda: pm(idx).logits), (ours, lambda: ours(idx))):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        F.cross_entropy(logits().flatten(0, 1), labels).backward()
        opt.step()
    export_peft(ours, tmp_path / "stepped", str(base), None)
    got = peft_weights(tmp_path / "stepped")
    want = get_peft_model_state_dict(pm)
    assert set(got) == set(want) and len(got) == 6
    for k, t in want.items():
        torch.testing.assert_close(got[k], t.detach(), atol=1e-5, rtol=0)  # lr 1e-2: 0.1% of a step
        assert not torch.equal(t.detach(), peft_weights(adapter)[k])  # the step moved every vector


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(Config(vocab_size=101, block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, **kw)).eval()


@pytest.mark.parametrize("targets,feedforward", [("key,value,mlp", "mlp"), ("all", "projection")])
def test_merge_equals_unmerged_and_unmerge_restores(targets, feedforward):
    model = tiny(bias=True, tie_embeddings=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        plain = model(idx)
        apply_ia3(model, IA3Args(targets=targets, feedforward=feedforward))
        torch.testing.assert_close(model(idx), plain, atol=0, rtol=0)  # vectors start at one: exactly the base
        randomize(model)
        unmerged = model(idx)
        assert not torch.allclose(unmerged, plain, atol=1e-3)
        layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
        for m in layers:
            m.merge()
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
        for m in layers:
            m.unmerge()
    for k, v in model.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], atol=1e-6, rtol=1e-6)
    merge_ia3(model)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)  # merge_ia3 folds the same vectors


def test_weighted_merge_interpolates_from_identity():
    model = tiny(bias=True)
    apply_ia3(model, IA3Args(targets="all"))
    randomize(model)
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        half = {n: 1 + 0.5 * (p - 1) for n, p in model.named_parameters() if n.endswith("ia3_l")}
        ref = tiny(bias=True)
        apply_ia3(ref, IA3Args(targets="all"))
        for n, p in ref.named_parameters():
            if n in half:
                p.copy_(half[n])
        expected = ref(idx)
        torch.testing.assert_close(merge_ia3(model, 0.5)(idx), expected, atol=1e-5, rtol=1e-5)


def test_merged_folder_loads_in_transformers_with_same_logits(tmp_path):
    base = make_hf("llama-bias", tmp_path)
    model = load_hf_checkpoint(base).eval()
    apply_ia3(model, IA3Args(targets="all", feedforward="mlp"))
    randomize(model)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = model(idx)
    METHOD.merge(model, 1.0)
    save_hf_checkpoint(model, tmp_path / "merged", source_dir=base)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_base_scales_the_quantized_matmul_and_merges_dequantized(mode):
    idx = torch.randint(0, 101, (2, 16))
    q = quantize_model(tiny(bias=True), mode, torch.float32)
    apply_ia3(q, IA3Args(targets="all"))
    assert all(m.quantized for m in q.modules() if isinstance(m, IA3Linear))
    randomize(q)
    vectors = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith("ia3_l")}
    ref = dequantize_model(quantize_model(tiny(bias=True), mode, torch.float32))
    apply_ia3(ref, IA3Args(targets="all"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in vectors:
                p.copy_(vectors[n])
        expected = ref(idx)
        unmerged = q(idx)
        torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="quantized"):
            q.transformer.h[0].attn.qkv.merge()
        merged = merge_ia3(q)
        assert type(merged.transformer.h[0].attn.qkv) is torch.nn.Linear
        torch.testing.assert_close(merged(idx), unmerged, atol=1e-4, rtol=1e-4)


def test_args_defaults_and_checks():
    args = IA3Args()
    assert (args.targets, args.feedforward) == (["key", "value", "mlp"], ["mlp"])
    assert IA3Args(targets="all", feedforward="none").targets == ["query", "key", "value", "projection", "mlp"]
    for bad, flag in ((dict(targets="head"), "--ia3.targets"), (dict(targets=""), "--ia3.targets"),
                      (dict(feedforward="key"), "--ia3.feedforward")):
        with pytest.raises(ValueError, match=flag):
            IA3Args(**bad)
    assert tiny_args("ia3") is None  # the defaults fit the shared tiny models


def test_peft_folder_with_unsupported_parts_is_refused(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    _, adapter = make_peft(base, tmp_path, target_modules=["up_proj"], feedforward_modules=[])
    with pytest.raises(ValueError, match="up_proj"):
        import_peft(load_hf_checkpoint(base), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="modules_to_save"):
        import_peft(load_hf_checkpoint(base), adapter)


def test_commands_train_export_and_resume_from_a_peft_folder(tiny_checkpoint, json_data, tmp_path):
    def run(out, **kw):
        return finetune("ia3", checkpoint_dir=tiny_checkpoint, out_dir=out, data=JSON(json_path=json_data),
                        train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2, max_seq_length=64),
                        eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                        optimizer=OptimizerArgs(lr=1e-2), threads=2, **kw)

    first = run(tmp_path / "a")
    exported = export_command(adapter=tmp_path / "a" / "final", checkpoint_dir=tiny_checkpoint, format="peft",
                              out_dir=tmp_path / "p")
    idx = torch.randint(0, 49152, (1, 12))
    ours = load_hf_checkpoint(tiny_checkpoint).eval()
    load_any_adapter(ours, tmp_path / "a" / "final")
    pm = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                                        exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx), atol=1e-5, rtol=0)
    _, made = make_peft(tiny_checkpoint, tmp_path)  # a folder the real peft library wrote
    second = run(tmp_path / "b", resume_adapter=made)
    assert second["trainable_params"] == first["trainable_params"]
    manifest = json.loads((tmp_path / "b" / "final" / "leantune.json").read_text())
    assert manifest["method"] == "ia3" and manifest["method_args"]["targets"] == ["key", "value", "mlp"]
