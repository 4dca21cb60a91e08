"""T5 presets: every row equals `T5Config.from_hf` of the upstream config.json where we carry one, builds a meta-device
`T5` with the parameter count transformers has for the checkpoint, and is found by name."""

import dataclasses

import pytest
import torch
import transformers as tf

from leantune.models.t5.model import T5, T5Config
from leantune.models.t5.presets import T5_PRESETS, find_t5_preset, t5_preset_names

# Upstream config.json files (every field but task_specific_params; copied from the Hub repo named by the key).
# T5 v1.0 files have no tie_word_embeddings, feed_forward_proj or relative_attention_max_distance: defaults apply.
HF_CONFIGS = {
    "google-t5/t5-small": {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
        "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
        "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
        "num_heads": 8, "num_layers": 6, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
        "vocab_size": 32128,
    },
    "google/flan-t5-base": {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
        "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": 12,
        "num_heads": 12, "num_layers": 12, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": 32128,
    },
    "google/flan-t5-large": {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 2816, "d_kv": 64, "d_model": 1024,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
        "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": 24,
        "num_heads": 16, "num_layers": 24, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": 32128,
    },
}

# What transformers' `num_parameters()` reports for each loaded checkpoint (the shared embedding counted once).
PUBLISHED = {
    "google-t5/t5-small": 60_506_624, "google-t5/t5-base": 222_903_552, "google-t5/t5-large": 737_668_096,
    "google/flan-t5-small": 76_961_152, "google/flan-t5-base": 247_577_856, "google/flan-t5-large": 783_150_080,
    "google/flan-t5-xl": 2_849_757_184,
}


def _architecture(cfg: T5Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "extra")}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_preset_equals_upstream_config_json(name):
    assert _architecture(T5Config.from_hf(HF_CONFIGS[name])) == _architecture(T5Config.from_name(name))


def _transformers_count(cfg: T5Config) -> int:
    """Parameters of transformers' model for the checkpoint, built on the meta device. transformers 5 builds every
    T5 with the head tied to the embedding and unties it when the checkpoint stores its own (flan-t5 does), so an
    untied preset gets its own head here as loading would give it."""
    with torch.device("meta"):
        model = tf.T5ForConditionalGeneration(tf.T5Config.from_dict(cfg.to_hf()))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    assert model.config.scale_decoder_outputs == cfg.scale_decoder_outputs
    assert model.config.is_gated_act == cfg.is_gated_act and model.config.dense_act_fn == cfg.dense_act_fn
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", t5_preset_names())
def test_preset_parameter_count(name):
    cfg = T5Config.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in T5(cfg).parameters())
    assert ours == _transformers_count(cfg) == PUBLISHED[name]
    assert T5Config.from_hf(cfg.to_hf()).to_dict() == {**cfg.to_dict(), "name": ""}


def test_lookup_by_name():
    assert find_t5_preset("flan-t5-base")["name"] == "google/flan-t5-base"
    assert find_t5_preset("Google/FLAN-T5-XL")["d_model"] == 2048
    assert find_t5_preset("t5-small")["name"] == "google-t5/t5-small"
    row = find_t5_preset("t5-base")
    row["d_model"] = 1
    assert T5_PRESETS["google-t5/t5-base"]["d_model"] == 768  # a copy, never the table itself
    with pytest.raises(ValueError, match="did you mean: google/flan-t5-base"):
        find_t5_preset("flan-t5-bsae")
