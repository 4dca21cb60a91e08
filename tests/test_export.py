"""`leantune export`: merged HF folder, PEFT adapter and GGUF hand-off, from a leantune adapter folder."""

from pathlib import Path

import peft
import pytest
import torch
import transformers as tf

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.commands.export import export as export_command
from leantune.methods import apply_method, build_manifest, method_args_class, save_checkpoint
from leantune.peft.lora import LoRALinear

V = 160


class _Tok:
    """The three fields build_manifest reads from a tokenizer."""

    bos_id, eos_ids, pad_id = 1, [2], 0


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def make_adapter(base, out, method, **args):
    """Write a leantune adapter folder without training: random nonzero trainable tensors plus the manifest."""
    model = load_hf_checkpoint(base).eval()
    method_args = method_args_class(method)(**args)
    trainable = apply_method(model, method, method_args)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)
    manifest = build_manifest(method, method_args, base, _Tok(), None, "32-true")
    out.mkdir()
    save_checkpoint(out, model, method, trainable, manifest, base)
    return model, out


def hf_model(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_export_hf_merged_matches_unmerged(base, tmp_path):
    ours, adapter = make_adapter(base, tmp_path / "lora", "lora", r=4, alpha=8, dropout=0.0, targets="all")
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
    out = export_command(adapter=adapter, checkpoint_dir=base, format="hf", out_dir=tmp_path / "merged")
    with torch.no_grad():
        actual = hf_model(out)(idx).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)  # merged fp32 sums round differently


def test_export_hf_without_adapter_reexports_base(base, tmp_path):
    out = export_command(checkpoint_dir=base, format="hf", out_dir=tmp_path / "again", dtype="bfloat16")
    from safetensors.torch import load_file

    written, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert written.keys() == original.keys()
    for k, t in written.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, original[k].to(torch.bfloat16)), k


def test_export_peft_loads_in_peft(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out_dir is relative to the working directory
    ours, adapter = make_adapter(base, tmp_path / "lora", "lora", r=4, alpha=16, dropout=0.0,
                                 targets=["query", "value", "mlp", "head"])
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
    out = export_command(adapter=adapter, checkpoint_dir=base, format="peft")
    assert out == Path("out/export") / f"{adapter.parent.name}-{adapter.name}-peft"
    assert (out / "adapter_model.safetensors").is_file() and (out / ".leantune-output").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):  # leantune's own export: replaced only on request
        export_command(adapter=adapter, checkpoint_dir=base, format="peft")
    assert export_command(adapter=adapter, checkpoint_dir=base, format="peft", overwrite=True) == out
    pm = peft.PeftModel.from_pretrained(hf_model(base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, expected, atol=1e-5, rtol=0)


def test_export_peft_of_adapter_v2_errors_clearly(base, tmp_path):
    _, adapter = make_adapter(base, tmp_path / "av2", "adapter_v2", prompt_length=4, start_layer=0)
    with pytest.raises(ValueError, match="adapter_v2.*no PEFT-format equivalent"):
        export_command(adapter=adapter, checkpoint_dir=base, format="peft", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="--adapter"):
        export_command(checkpoint_dir=base, format="peft", out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_gguf_passes_merged_model(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import leantune.export as export_lib

    ours, adapter = make_adapter(base, tmp_path / "lora", "lora", r=4, alpha=8, dropout=0.0, targets=["query"])
    idx = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        expected = ours(idx)
    seen = {}

    def fake_export_gguf(model, tokenizer_dir, out_path, gguf_type="f16"):
        seen.update(tokenizer_dir=tokenizer_dir, gguf_type=gguf_type, lora=any(isinstance(m, LoRALinear)
                                                                                for m in model.modules()))
        with torch.no_grad():
            seen["logits"] = model(idx)
        return out_path

    monkeypatch.setattr(export_lib, "export_gguf", fake_export_gguf)
    path = export_command(adapter=adapter, checkpoint_dir=base, format="gguf", gguf_type="q8_0")
    assert path == Path("out/export") / f"{adapter.parent.name}-{adapter.name}-gguf" / "model-q8_0.gguf"
    assert seen["tokenizer_dir"] == base and seen["gguf_type"] == "q8_0" and not seen["lora"]
    torch.testing.assert_close(seen["logits"], expected, atol=1e-4, rtol=0)
