"""Presets: every row builds a Config and a meta-device GPT with the published parameter count; rows equal
`config_from_hf` of the upstream config.json; transformers builds the same number of parameters; name lookup."""

import dataclasses

import pytest
import torch
import transformers as tf

from leantune.models.decoder.config import Config, config_field_names
from leantune.models.decoder.families import FAMILIES, config_from_hf
from leantune.models.decoder.model import GPT
from leantune.models.decoder.presets import PRESETS, find_preset, preset_names

# Upstream config.json files (the fields that matter; copied from the Hub repo named by the key).
HF_CONFIGS = {
    "openai-community/gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257,
    },
    "EleutherAI/pythia-70m": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
    },
    # No tie_word_embeddings key: FalconConfig's default (True) applies.
    "tiiuae/falcon-7b": {
        "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
        "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
        "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
        "parallel_attn": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 65024,
    },
    "tiiuae/falcon-40b": {
        "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
        "hidden_size": 8192, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
        "multi_query": True, "new_decoder_architecture": True, "num_attention_heads": 128, "num_hidden_layers": 60,
        "num_kv_heads": 8, "parallel_attn": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 65024,
    },
    "meta-llama/Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
    },
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    },
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    },
    "Qwen/Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
    },
    "HuggingFaceTB/SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
    },
    "microsoft/phi-2": {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
        "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 51200,
    },
}

# Published totals (unique parameters, tied weights counted once); each also equals `analytic_params` below.
KNOWN_COUNTS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-360M": 361_821_120,
    "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "EleutherAI/pythia-70m": 70_426_624,
    "EleutherAI/pythia-160m": 162_322_944,
    "EleutherAI/pythia-410m": 405_334_016,
    "EleutherAI/pythia-1b": 1_011_781_632,
    "EleutherAI/pythia-1.4b": 1_414_647_808,
    "EleutherAI/pythia-2.8b": 2_775_208_960,
    "EleutherAI/pythia-6.9b": 6_857_302_016,
    "EleutherAI/pythia-12b": 11_846_072_320,
    "openai-community/gpt2": 124_439_808,
    "microsoft/phi-2": 2_779_683_840,
    "tiiuae/falcon-7b": 6_921_720_704,
    "tiiuae/falcon-40b": 41_303_293_952,
}

# Every format (falcon with both decoder architectures, llama with and without llama3 RoPE scaling); meta-device
# construction keeps even the 40B model cheap.
HF_SUBSET = sorted(HF_CONFIGS)


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def meta_gpt(cfg: Config) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def analytic_params(c: Config) -> int:
    """Parameter count from the config alone, following the HF module layouts (independent of GPT)."""
    C, V, I = c.n_embd, c.padded_vocab_size, c.intermediate_size  # noqa: E741
    q, kv = c.n_head * c.head_size, 2 * c.n_query_groups * c.head_size
    norm = 2 * C if c.norm_class == "layernorm" else C
    attn = C * (q + kv) + q * C + ((q + kv) if (c.bias or c.attn_bias) else 0) + (C if c.bias else 0)
    if c.mlp_class == "swiglu":
        mlp = 3 * C * I + ((2 * I + C) if c.bias else 0)
    else:
        mlp = 2 * C * I + ((I + C) if c.bias else 0)
    layer = attn + mlp + norm * (1 if c.shared_attention_norm else 2)
    total = c.n_layer * layer + norm + V * C  # blocks, final norm, token embedding
    total += 0 if c.tie_embeddings else V * C
    total += V if c.lm_head_bias else 0
    total += c.block_size * C if c.learned_pos_emb else 0
    return total


# ---- table ---------------------------------------------------------------------------------------------------------

def test_required_presets_present():
    required = ["openai-community/gpt2", "stabilityai/stablelm-base-alpha-3b", "stabilityai/stablelm-base-alpha-7b",
                "tiiuae/falcon-7b", "tiiuae/falcon-40b", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf",
                "meta-llama/Llama-2-70b-hf", "meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.2-1B",
                "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.1", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B",
                "Qwen/Qwen2.5-7B", "microsoft/phi-2"]
    required += [f"EleutherAI/pythia-{s}" for s in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")]
    required += [f"HuggingFaceTB/SmolLM2-{s}{i}" for s in ("135M", "360M", "1.7B") for i in ("", "-Instruct")]
    assert not set(required) - set(preset_names())
    assert preset_names() == list(PRESETS)


@pytest.mark.parametrize("name", preset_names())
def test_row_is_plain_config_kwargs(name):
    row = PRESETS[name]
    assert set(row) <= set(config_field_names()) - {"name", "extra"}
    assert row["padded_vocab_size"] == row["vocab_size"]  # exactly the HF embedding row count
    assert row["hf_model_type"] in FAMILIES


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_config_and_meta_gpt(name):
    cfg = Config.from_name(name)
    assert cfg.name == name
    model = meta_gpt(cfg)
    assert unique_params(model) == analytic_params(cfg)
    assert model.lm_head.weight.shape == (cfg.padded_vocab_size, cfg.n_embd)


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_known_parameter_counts(name):
    cfg = Config.from_name(name)
    assert analytic_params(cfg) == KNOWN_COUNTS[name]
    assert unique_params(meta_gpt(cfg)) == KNOWN_COUNTS[name]


def test_instruct_variants_share_the_base_architecture():
    arch = ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "vocab_size", "tie_embeddings")
    for name in preset_names():
        if name.endswith("-Instruct"):
            base, inst = PRESETS[name.removesuffix("-Instruct")], PRESETS[name]
            assert {k: base[k] for k in arch} == {k: inst[k] for k in arch}, name


def test_falcon_7b_untied_matches_litgpt_count():
    # Lit-Parrot/LitGPT stored lm_head separately; HF ties it to the embedding (no tie_word_embeddings key).
    cfg = Config.from_name("falcon-7b", tie_embeddings=False)
    assert analytic_params(cfg) == unique_params(meta_gpt(cfg)) == 7_217_189_760
    assert 7_217_189_760 - 6_921_720_704 == 65024 * 4544


def test_architecture_facts():
    f7, f40 = Config.from_name("falcon-7b"), Config.from_name("falcon-40b")
    assert (f7.n_query_groups, f7.head_size, f7.shared_attention_norm, f7.bias, f7.tie_embeddings) == (1, 64, True,
                                                                                                          False, True)
    assert (f40.n_query_groups, f40.head_size, f40.shared_attention_norm) == (8, 64, False)
    assert meta_gpt(f40).transformer.h[0].norm_2 is not None
    phi = Config.from_name("phi-2")
    assert (phi.head_size, phi.rope_n_elem, phi.gelu_approximate, phi.lm_head_bias) == (80, 32, "tanh", True)
    assert Config.from_name("gpt2").rope_n_elem == 0
    assert Config.from_name("pythia-70m").rope_n_elem == 16
    assert Config.from_name("Llama-3.2-3B").head_size == 128
    assert Config.from_name("Qwen2.5-0.5B").attn_bias and not Config.from_name("Qwen2.5-0.5B").bias
    assert Config.from_name("Llama-3.2-1B-Instruct").eos_token_id == [128001, 128008, 128009]
    assert Config.from_name("SmolLM2-135M-Instruct").eos_token_id == 2


# ---- from_hf agreement ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_from_hf_equals_preset(name):
    from_hf = dataclasses.asdict(config_from_hf(HF_CONFIGS[name], name=name))
    preset = dataclasses.asdict(Config.from_name(name))
    from_hf.pop("extra"), preset.pop("extra")
    assert from_hf == preset


@pytest.mark.parametrize("name", HF_SUBSET)
def test_transformers_builds_the_same_parameter_count(name):
    hf = dict(HF_CONFIGS[name])
    hf_cfg = tf.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        hf_model = tf.AutoModelForCausalLM.from_config(hf_cfg)
    assert unique_params(hf_model) == unique_params(meta_gpt(Config.from_name(name))) == KNOWN_COUNTS[name]


# ---- lookup --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "expected"), [
    ("tiiuae/falcon-7b", "tiiuae/falcon-7b"),
    ("falcon-7b", "tiiuae/falcon-7b"),
    ("TIIUAE/Falcon-7B", "tiiuae/falcon-7b"),
    ("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
    ("meta-llama/llama-2-7b", "meta-llama/Llama-2-7b-hf"),
    ("gpt2", "openai-community/gpt2"),
    ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
])
def test_find_preset_spellings(query, expected):
    row = find_preset(query)
    assert row["name"] == expected
    assert {k: v for k, v in row.items() if k != "name"} == PRESETS[expected]


def test_every_alias_selects_one_preset():
    for name in preset_names():
        short = name.split("/", 1)[1]
        for query in (name, short, name.lower(), short.upper()):
            assert find_preset(query)["name"] == name


def test_find_preset_unknown_lists_close_matches():
    with pytest.raises(ValueError, match="falcon-7b") as exc:
        find_preset("falcon-7")
    assert "did you mean" in str(exc.value)
    with pytest.raises(ValueError, match="no preset named 'zzzz-nothing'"):
        find_preset("zzzz-nothing")
    with pytest.raises(ValueError, match="no preset"):
        Config.from_name("Llama-2-8b")


def test_find_preset_returns_a_copy():
    row = find_preset("Llama-3.2-1B")
    row["rope_scaling"]["factor"] = 1.0
    row["n_layer"] = 1
    assert PRESETS["meta-llama/Llama-3.2-1B"]["rope_scaling"]["factor"] == 32.0
    assert PRESETS["meta-llama/Llama-3.2-1B"]["n_layer"] == 16
    assert Config.from_name("Llama-3.2-1B", n_layer=2).n_layer == 2
