"""PEFT format both ways: our LoRA exported loads in peft with the same logits, and peft's LoRA imports exactly."""

import json

import peft
import pytest
import torch
import transformers as tf
from tiny_families import V, make_hf  # the same tiny random configs per family

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.checkpoint.peft_dir import is_peft_dir
from leantune.methods import load_any_adapter
from leantune.peft.lora import LoRAArgs, LoRALinear, apply_lora
from leantune.peft.peft_format import LORA

export_peft = LORA.export


def import_peft(model, folder):
    """Load a PEFT LoRA folder; the names of the parameters it made trainable."""
    LORA.load(model, folder)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def randomize_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)


def peft_logits(base_dir, adapter_dir, idx):
    hf = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return pm(idx).logits


@pytest.mark.parametrize("name,targets,rslora", [
    ("llama-gqa", "all", False),
    ("llama-gqa", ["key", "mlp"], True),
    ("falcon-7b-mqa", ["query", "value"], False),
    ("falcon-40b-gqa", ["query", "value", "head"], True),
    ("pythia-partial-rotary", ["query", "key", "value", "mlp", "head"], False),
    ("gpt2", ["key", "value", "projection", "mlp"], False),
    ("phi-2", ["query", "value", "projection", "mlp"], False),
])
def test_export_loads_in_peft_with_same_logits(tmp_path, name, targets, rslora):
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = LoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets, rslora=rslora)
    apply_lora(ours, args)
    randomize_lora(ours)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    assert is_peft_dir(out) and not is_peft_dir(base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    actual = peft_logits(base, out, idx)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def make_peft(base, tmp_path, target_modules, r=4, alpha=8, **kw):
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=target_modules, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval().save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


@pytest.mark.parametrize("name,target_modules,rslora", [
    ("llama-gqa", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], False),
    ("llama-gqa", ["q_proj", "v_proj", "up_proj"], True),
    ("falcon-40b-gqa", ["query_key_value", "dense_h_to_4h"], False),
    ("pythia-partial-rotary", ["query_key_value", "dense"], False),
    ("gpt2", ["c_attn", "c_fc"], False),
    ("phi-2", ["q_proj", "k_proj", "dense", "fc2"], False),
])
def test_import_peft_matches_peft(tmp_path, name, target_modules, rslora):
    base = make_hf(name, tmp_path)
    pm, adapter = make_peft(base, tmp_path, target_modules, use_rslora=rslora, fan_in_fan_out=name == "gpt2")
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = pm(idx).logits
    ours = load_hf_checkpoint(base).eval()
    trainable = import_peft(ours, adapter)
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)
    # load_any_adapter dispatches on the folder type
    other = load_hf_checkpoint(base).eval()
    manifest = load_any_adapter(other, adapter)
    assert manifest["method"] == "lora" and manifest["method_args"]["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(other(idx), expected, atol=1e-5, rtol=0)


def test_export_then_import_round_trips(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = LoRAArgs(r=4, alpha=8, dropout=0.0, targets="all")
    apply_lora(ours, args)
    randomize_lora(ours)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    back = load_hf_checkpoint(base).eval()
    import_peft(back, out)
    idx = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours(idx), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_import_refuses_unsupported_options(tmp_path, change, match):
    base = make_hf("llama-gqa", tmp_path)
    _, adapter = make_peft(base, tmp_path, ["q_proj", "v_proj"])
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        import_peft(load_hf_checkpoint(base), adapter)
