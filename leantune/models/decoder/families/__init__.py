"""The family table: one `Family` record per HF `model_type`, and the translations that read it.

Adding a family is one record (a module here plus a line in `FAMILIES`) and a tiny config in tests/test_parity.py,
which checks that every registered family has one. Families import only `leantune.models.decoder.config`, so data, checkpoint
and model code may all read the table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leantune.models.decoder.config import Config
from leantune.models.decoder.families.base import Family, QKVLayout, transformers_major
from leantune.models.decoder.families.falcon import FALCON
from leantune.models.decoder.families.gpt2 import GPT2
from leantune.models.decoder.families.gpt_neox import GPT_NEOX
from leantune.models.decoder.families.llama import LLAMA, MISTRAL, QWEN2
from leantune.models.decoder.families.phi import PHI

__all__ = ["FAMILIES", "Family", "QKVLayout", "config_from_checkpoint", "config_from_hf", "config_to_hf",
           "default_prompt_style", "family_of", "gguf_family", "transformers_major"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, GPT_NEOX, FALCON, GPT2, PHI)}


def family_of(config_or_model_type: Config | str) -> Family:
    """The record of a `Config` (its `hf_model_type`) or of an HF `model_type`; ValueError naming the supported ones."""
    mt = config_or_model_type.hf_model_type if isinstance(config_or_model_type, Config) else config_or_model_type
    family = FAMILIES.get(mt)
    if family is None:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family


# ---- config.json <-> Config ----------------------------------------------------------------------------------
def config_from_hf(hf: Mapping[str, Any], name: str = "", **overrides: Any) -> Config:
    """Translate a Hugging Face config.json dict into a Config."""
    family = family_of(hf.get("model_type"))
    kw: dict[str, Any] = dict(name=name, hf_model_type=family.model_type, bos_token_id=hf.get("bos_token_id"),
                              eos_token_id=hf.get("eos_token_id"), tie_embeddings=hf.get("tie_word_embeddings", False))
    kw.update(family.config_from_hf(dict(hf)))
    kw.update(overrides)
    return Config(**kw)


def config_from_checkpoint(checkpoint_dir: str | Path, **overrides: Any) -> Config:
    """The Config of an HF model folder (its config.json), named after the folder."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {checkpoint_dir} a Hugging Face model folder?")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:  # name the file: a bare "Expecting value" says nothing about where
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    return config_from_hf(hf, name=Path(checkpoint_dir).name, **overrides)


def config_to_hf(config: Config, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers config.json for `config`. Refuses a Config its family's config.json cannot describe (say a
    Mistral with linear biases), naming the fields: such a folder would load as a different model, or not at all."""
    family = family_of(config)
    c = config
    d: dict[str, Any] = {"model_type": family.model_type, "vocab_size": c.padded_vocab_size,
                         "tie_word_embeddings": c.tie_embeddings, "torch_dtype": torch_dtype,
                         "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                         "architectures": [family.architecture], **family.config_to_hf(c)}
    lost = _differing_fields(c, config_from_hf(d))
    if lost:
        raise ValueError(f"a {family.model_type} config.json cannot express this model's "
                         f"{', '.join(f'{k}={getattr(c, k)!r}' for k in lost)}; transformers would build a different "
                         f"model (pick a family that has these features, or change the Config)")
    return d


def _differing_fields(want: Config, got: Config) -> list[str]:
    """Fields that change the model and did not survive config.json (vocab_size: the file holds the padded rows)."""
    ignore = {"name", "extra", "vocab_size"}
    if want.learned_pos_emb:
        ignore |= {"rotary_percentage", "rope_base", "rope_scaling"}
    if want.mlp_class == "swiglu":
        ignore.add("gelu_approximate")
    return [f.name for f in dataclasses.fields(Config)
            if f.name not in ignore and getattr(want, f.name) != getattr(got, f.name)]


# ---- other formats' names ------------------------------------------------------------------------------------
def default_prompt_style(hf: Mapping[str, Any]) -> str | None:
    """The prompt style a config.json's family implies (for checkpoints without a chat template), or None."""
    mt = hf.get("model_type")
    family = FAMILIES.get(mt) or next((f for f in FAMILIES.values() if mt in f.aliases), None)
    return family.default_prompt_style(hf) if family else None


def gguf_family(arch: str) -> Family:
    """The family a GGUF architecture imports as: the first registered family that writes it (llama.cpp's
    `llama` is written for Llama and Mistral and read back as Llama)."""
    family = next((f for f in FAMILIES.values() if f.gguf_arch == arch), None)
    if family is None:
        supported = sorted({f.gguf_arch for f in FAMILIES.values() if f.gguf_arch})
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(supported)})")
    return family
