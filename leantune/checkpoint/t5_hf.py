"""Hugging Face T5 folders in and out: the key map between transformers' `T5ForConditionalGeneration` and `T5`,
loading (meta-device build, tensors assigned) and saving (bit-identical tensors: HF -> ours -> HF).

The map is 1:1 per tensor except for the embeddings: HF folders hold `shared.weight` and sometimes copies of it as
`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (tied, so equal), which `T5` does not duplicate; and
the relative position bias table lives in block 0 of each stack there, on the stack here. `lm_head.weight` is absent
when the head is tied. transformers 5 writes `tie_word_embeddings: true` for every T5 and unties a head the checkpoint
stores with other values; the loader does the same, so folders of either transformers generation load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from leantune.checkpoint.hf import SHARD_BYTES, iter_hf_tensors, write_hf_folder
from leantune.models.t5.model import T5, T5Config

_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints carry an unused cross-attention bias table; transformers ignores it too.
_IGNORED = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}

# our block part -> (HF sublayer index, HF module); the feed-forward is sublayer 1 in the encoder, 2 in the decoder.
_PARTS = {
    "attn": (0, "SelfAttention"), "attn_norm": (0, "layer_norm"),
    "cross_attn": (1, "EncDecAttention"), "cross_attn_norm": (1, "layer_norm"),
    "ff": (None, "DenseReluDense"), "ff_norm": (None, "layer_norm"),
}
_OUR_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.([a-z_]+)((?:\..+)?)$")
_HF_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.([A-Za-z_]+)((?:\..+)?)$")
_REL_BIAS_HF = re.compile(r"^(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias((?:\..+)?)$")
_REL_BIAS_OURS = re.compile(r"^(encoder|decoder)\.relative_attention_bias((?:\..+)?)$")
_SAME = re.compile(r"^(shared|lm_head|(?:encoder|decoder)\.final_layer_norm)((?:\..+)?)$")


def _sublayer(stack: str, part: str) -> int:
    index, _ = _PARTS[part]
    return index if index is not None else (1 if stack == "encoder" else 2)


def hf_name(ours: str) -> str:
    """Our module path or state-dict key -> transformers' (e.g. "decoder.block.1.cross_attn.q" ->
    "decoder.block.1.layer.1.EncDecAttention.q"); for PEFT exports and the checkpoint map."""
    if m := _REL_BIAS_OURS.match(ours):
        return f"{m.group(1)}.block.0.layer.0.SelfAttention.relative_attention_bias{m.group(2)}"
    if _SAME.match(ours):
        return ours
    m = _OUR_BLOCK.match(ours)
    if not m or m.group(3) not in _PARTS:
        raise KeyError(f"{ours!r} is not a T5 module or tensor name")
    stack, i, part, rest = m.groups()
    return f"{stack}.block.{i}.layer.{_sublayer(stack, part)}.{_PARTS[part][1]}{rest}"


def our_name(hf: str) -> str:
    """transformers' T5 module path or key -> ours (the inverse of `hf_name`)."""
    if m := _REL_BIAS_HF.match(hf):
        return f"{m.group(1)}.relative_attention_bias{m.group(2)}"
    if _SAME.match(hf):
        return hf
    m = _HF_BLOCK.match(hf)
    if m:
        stack, i, sub, module, rest = m.groups()
        for part, (_, hf_module) in _PARTS.items():
            if hf_module == module and _sublayer(stack, part) == int(sub) and (stack == "decoder" or "cross" not in part):
                return f"{stack}.block.{i}.{part}{rest}"
    raise KeyError(f"{hf!r} is not a T5ForConditionalGeneration tensor leantune knows")


def t5_from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: T5Config) -> tuple[dict[str, torch.Tensor], T5Config]:
    """HF tensors -> (our state dict, config), untying the head when the checkpoint stores a different one.
    Unknown keys raise with the list; embedding copies must equal `shared.weight` (T5 has one embedding)."""
    shared = hf_sd.get("shared.weight")
    copies = {k: hf_sd[k] for k in _EMBED_COPIES if k in hf_sd}
    if shared is None and copies:
        shared = next(iter(copies.values()))  # only the tied copies were saved
    if shared is None:
        raise KeyError("checkpoint has no shared.weight (the token embedding)")
    for k, t in copies.items():
        if not torch.equal(t, shared):
            raise ValueError(f"checkpoint's {k} differs from shared.weight: separate encoder/decoder embeddings are "
                             "not supported")
    head = hf_sd.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None and not torch.equal(head, shared):
        config = config.replace(tie_word_embeddings=False)  # transformers 5: both stored and different -> untied
    out, unknown = {"shared.weight": shared}, []
    for key, t in hf_sd.items():
        if key in _IGNORED or key in _EMBED_COPIES or key == "shared.weight":
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the same values as shared.weight (checked above)
        try:
            out[our_name(key)] = t
        except KeyError:
            unknown.append(key)
    if unknown:
        raise KeyError(f"checkpoint has {len(unknown)} keys a T5 model does not know: {unknown[:20]}")
    return out, config


def t5_to_hf_state_dict(sd: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' keys (a tied head is not written: transformers ties it on load)."""
    return {hf_name(k): t for k, t in sd.items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def load_t5_checkpoint(checkpoint_dir: str | Path, config: T5Config | None = None, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu") -> T5:
    """Build `T5` on the meta device and assign the folder's weights (safetensors or .bin, sharded or not).
    Missing or unexpected tensors raise, naming them. The model comes back in eval mode (T5 has dropout: call
    `.train()` to finetune)."""
    checkpoint_dir = Path(checkpoint_dir)
    if config is None:
        with open(checkpoint_dir / "config.json", encoding="utf-8") as fh:
            config = T5Config.from_hf(json.load(fh))
    sd, config = t5_from_hf_state_dict(dict(iter_hf_tensors(checkpoint_dir)), config)
    with torch.device("meta"):
        model = T5(config)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(hf_name(k) for k in expected - sd.keys())  # reported in the checkpoint's own names
    unexpected = sorted(hf_name(k) for k in sd.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{checkpoint_dir}: weights do not match the T5 architecture in config.json; missing "
                       f"{missing[:20]} ({len(missing)} total), unexpected {unexpected[:20]} ({len(unexpected)} total)")
    # copy=True: fresh aligned tensors instead of views into the file's memory map (see checkpoint.hf).
    sd = {k: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
          for k, t in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    return model.eval()


def save_t5_checkpoint(model: T5, out_dir: str | Path, source_dir: str | Path | None = None,
                       dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, kind: str | None = None) -> Path:
    """Write an HF folder transformers loads as `T5ForConditionalGeneration`: config.json (source_dir's, updated
    for dtype and head tying, else `T5Config.to_hf`), safetensors shards (+ index), and source_dir's tokenizer and
    generation files. Atomic: the folder appears complete or not at all."""
    out_dir = Path(out_dir)
    config = model.config
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
          for k, v in model.state_dict().items()}
    hf_sd = t5_to_hf_state_dict(sd, config)
    written = dtype or sd["shared.weight"].dtype
    src_cfg = Path(source_dir) / "config.json" if source_dir else None
    if src_cfg is not None and src_cfg.is_file():
        with open(src_cfg, encoding="utf-8") as fh:
            cfg_dict = json.load(fh)
        cfg_dict.pop("dtype", None)
        cfg_dict["torch_dtype"] = str(written).removeprefix("torch.")
        cfg_dict["tie_word_embeddings"] = config.tie_word_embeddings  # a merged head adapter unties
        if "scale_decoder_outputs" in cfg_dict or config.scale_decoder_outputs != config.tie_word_embeddings:
            cfg_dict["scale_decoder_outputs"] = config.scale_decoder_outputs
    else:
        cfg_dict = config.to_hf(str(written).removeprefix("torch."))
    return write_hf_folder(out_dir, cfg_dict, hf_sd, source_dir, shard_bytes, kind)
