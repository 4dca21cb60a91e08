"""T5 presets: `T5Config` keyword arguments for known encoder-decoder checkpoints, keyed by their Hugging Face repo id.

Every row is plain data copied from the upstream `config.json` of the repo named by the key, spelled in `T5Config`'s
field names (which follow transformers' `T5Config`), so `T5Config.from_hf(config_json)` and `T5Config(**row)` agree
(tests/test_t5_presets.py checks both, and the parameter counts against transformers).

Two generations share the format:
- T5 v1.0 (google-t5/t5-*): ReLU feed-forward, and a head tied to the shared embedding. Their config.json files have
  no `tie_word_embeddings` or `feed_forward_proj` key, so transformers' defaults apply (tied, "relu"); a tied head
  rescales the decoder output by d_model**-0.5 before the projection.
- T5 v1.1 / flan-t5 (google/flan-t5-*): gated-GELU feed-forward (`feed_forward_proj` "gated-gelu", which
  transformers runs with the tanh-approximated "gelu_new"), `tie_word_embeddings` false: an untied head, no rescale.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

# Shared by every checkpoint below (config.json: vocab_size, relative_attention_num_buckets,
# relative_attention_max_distance (absent in v1.0 files: transformers' default 128), layer_norm_epsilon, dropout_rate,
# pad_token_id, eos_token_id, decoder_start_token_id).
_COMMON: dict[str, Any] = dict(
    vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)


def _t5_v1_0(d_model: int, d_ff: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {**_COMMON, "d_model": d_model, "d_kv": 64, "d_ff": d_ff, "num_layers": num_layers,
            "num_decoder_layers": num_layers, "num_heads": num_heads, "dense_act_fn": "relu", "is_gated_act": False,
            "tie_word_embeddings": True, "scale_decoder_outputs": True}


def _flan_t5(d_model: int, d_ff: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {**_COMMON, "d_model": d_model, "d_kv": 64, "d_ff": d_ff, "num_layers": num_layers,
            "num_decoder_layers": num_layers, "num_heads": num_heads, "dense_act_fn": "gelu_new", "is_gated_act": True,
            "tie_word_embeddings": False, "scale_decoder_outputs": False}


T5_PRESETS: dict[str, dict[str, Any]] = {
    # ---- T5 v1.0 (config.json: d_model, d_ff, num_layers, num_heads; d_kv 64) ----------------------------------
    "google-t5/t5-small": _t5_v1_0(512, 2048, 6, 8),
    "google-t5/t5-base": _t5_v1_0(768, 3072, 12, 12),
    "google-t5/t5-large": _t5_v1_0(1024, 4096, 24, 16),
    # ---- flan-t5 (T5 v1.1 architecture; config.json: d_model, d_ff, num_layers = num_decoder_layers, num_heads) ---
    "google/flan-t5-small": _flan_t5(512, 1024, 8, 6),
    "google/flan-t5-base": _flan_t5(768, 2048, 12, 12),
    "google/flan-t5-large": _flan_t5(1024, 2816, 24, 16),
    "google/flan-t5-xl": _flan_t5(2048, 5120, 24, 32),
}


def t5_preset_names() -> list[str]:
    """All T5 preset repo ids, in table order."""
    return list(T5_PRESETS)


def find_t5_preset(name: str) -> dict[str, Any]:
    """The `T5Config` keyword arguments of a preset (a fresh copy, with `name` set to the repo id).

    Accepts the repo id ("google/flan-t5-base") or the part after the slash ("flan-t5-base"), case-insensitively;
    raises ValueError naming close matches otherwise.
    """
    key = name.strip().lower()
    aliases = {alias: repo for repo in T5_PRESETS for alias in (repo.lower(), repo.lower().split("/", 1)[-1])}
    if key not in aliases:
        close = difflib.get_close_matches(key, list(aliases), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(dict.fromkeys(aliases[c] for c in close))}" if close else ""
        raise ValueError(f"no T5 preset named {name!r}{hint}. `leantune.models.t5.presets.t5_preset_names()` lists them")
    repo_id = aliases[key]
    return {"name": repo_id, **copy.deepcopy(T5_PRESETS[repo_id])}
