"""The family table: lookups, config.json both ways for every preset, refusals of what a config.json cannot say,
PEFT/GGUF/prompt-style names. Logits parity per family is in test_parity.py."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import leantune.models.decoder.families as families_pkg
from leantune.checkpoint.hf import hf_config_dict, load_hf_checkpoint, save_hf_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import (
    FAMILIES,
    config_from_hf,
    config_to_hf,
    default_prompt_style,
    family_of,
    gguf_family,
)
from leantune.models.decoder.families import base as families_base
from leantune.models.decoder.model import GPT
from leantune.models.decoder.presets import PRESETS, preset_names

TINY = dict(vocab_size=64, block_size=32, n_layer=1, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48)


def test_family_of_names_the_supported_types():
    assert family_of("gpt2") is FAMILIES["gpt2"] and family_of(Config(hf_model_type="phi")) is FAMILIES["phi"]
    with pytest.raises(ValueError, match=r"'t5' is not supported; supported: llama, mistral, qwen2"):
        family_of("t5")
    with pytest.raises(ValueError, match="is not supported"):
        config_from_hf({"model_type": "bert"})


def test_records_are_frozen_and_complete():
    for mt, f in FAMILIES.items():
        assert f.model_type == mt and f.architecture
        assert (f.qkv_layout == "split") == bool(f.qkv_modules), mt
        assert "attn.qkv" in f.linear_modules() and "attn.proj" in f.linear_modules(), mt
        assert set(f.global_map.values()) >= {"transformer.wte", "transformer.ln_f", "lm_head"}, mt
        with pytest.raises(dataclasses.FrozenInstanceError):
            f.model_type = "x"


def test_families_import_only_config():
    """Data, checkpoint and model code read the table, so the table reads nothing of theirs."""
    pkg = Path(families_pkg.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leantune"):
                assert node.module == "leantune.models.decoder.config" or node.module.startswith("leantune.models.decoder.families"), (path, node.module)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_survives_its_config_json(name):
    """config_to_hf then config_from_hf gives the preset back: both directions of every family's translation."""
    cfg = Config.from_name(name)
    back = config_from_hf(config_to_hf(cfg), name=name)
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("mt,changes,field", [
    ("mistral", dict(bias=True), "bias"),                # Mistral's linears have no bias in transformers
    ("qwen2", dict(bias=True), "bias"),                  # Qwen2: q/k/v bias only
    ("llama", dict(attn_bias=True), "attn_bias"),        # attention_bias also biases o_proj
    ("llama", dict(sliding_window=8), "sliding_window"),  # Llama has no sliding window
    ("falcon", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("gpt2", dict(mlp_class="swiglu"), "mlp_class"),
])
def test_config_json_refuses_what_it_cannot_say(mt, changes, field):
    base = next(Config.from_name(n) for n in preset_names() if PRESETS[n]["hf_model_type"] == mt)
    with pytest.raises(ValueError, match=rf"{mt} config.json cannot express this model's .*{field}="):
        hf_config_dict(base.replace(**changes))


def test_llama_bias_is_written_and_read(tmp_path):
    """The bug this catches: a bias=True Llama folder was written without attention_bias/mlp_bias and did not load."""
    torch.manual_seed(0)
    model = GPT(Config(hf_model_type="llama", bias=True, **TINY)).eval()
    d = hf_config_dict(model.config)
    assert (d["attention_bias"], d["mlp_bias"]) == (True, True)
    save_hf_checkpoint(model, tmp_path / "out")
    loaded = load_hf_checkpoint(tmp_path / "out").eval()
    assert loaded.config.bias
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_bias=True, mlp_bias=False"):
        config_from_hf({**d, "mlp_bias": False})


def test_peft_head_follows_the_installed_transformers(monkeypatch):
    neox = FAMILIES["gpt_neox"]
    monkeypatch.setattr(families_base, "transformers_major", lambda: 4)
    assert neox.peft_head_module() == "embed_out" and FAMILIES["llama"].peft_head_module() == "lm_head"
    monkeypatch.setattr(families_base, "transformers_major", lambda: 5)
    assert neox.peft_head_module() == "lm_head"


def test_transformers_version_is_read_without_importing_it(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    families_base.transformers_major.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", missing)
    try:
        assert families_base.transformers_major() == 5  # not installed: today's names
    finally:
        families_base.transformers_major.cache_clear()


def test_peft_names():
    assert FAMILIES["llama"].peft_target_modules()["attn.qkv"] == ("q_proj", "k_proj", "v_proj")
    assert FAMILIES["falcon"].peft_target_modules()["attn.qkv"] == ("query_key_value",)
    assert FAMILIES["gpt2"].transposed_linears and not FAMILIES["gpt_neox"].transposed_linears
    assert FAMILIES["phi"].linear_modules()["mlp.fc"] == ("mlp.fc1",)


def test_falcon_norm_names_follow_the_config():
    falcon = FAMILIES["falcon"]
    shared = Config(hf_model_type="falcon", parallel_residual=True, shared_attention_norm=True)
    separate = Config(hf_model_type="falcon", parallel_residual=True, shared_attention_norm=False)
    assert falcon.hf_layer_names(shared)["norm_1"] == "input_layernorm" and "norm_2" not in falcon.hf_layer_names(shared)
    assert (falcon.hf_layer_names(separate)["norm_1"], falcon.hf_layer_names(separate)["norm_2"]) == ("ln_attn", "ln_mlp")


@pytest.mark.parametrize("hf,style", [
    ({"model_type": "llama", "vocab_size": 128256}, "llama3"),
    ({"model_type": "llama", "vocab_size": 32000}, None),
    ({"model_type": "qwen2"}, "chatml"),
    ({"model_type": "falcon"}, "falcon"),
    ({"model_type": "RefinedWebModel"}, "falcon"),
    ({"model_type": "phi"}, "phi"),
    ({"model_type": "gpt2"}, None),
    ({"model_type": "t5"}, None),
    ({}, None),
])
def test_default_prompt_style(hf, style):
    assert default_prompt_style(hf) == style


def test_gguf_architectures():
    assert gguf_family("llama") is FAMILIES["llama"]
    assert {mt for mt, f in FAMILIES.items() if f.gguf_arch} == {"llama", "mistral"}
    with pytest.raises(ValueError, match="'qwen2' is not supported"):
        gguf_family("qwen2")


def test_prompt_styles_name_real_styles():
    from leantune.data.prompts import STYLES

    named = {f.prompt_style for f in FAMILIES.values()} | {s for f in FAMILIES.values() for _, s in f.vocab_prompt_styles}
    assert named - {None} <= set(STYLES)
