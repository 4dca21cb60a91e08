"""Hugging Face model folders in and out: key maps between HF layouts and `GPT`, loading and saving.

Loading builds the model on the meta device and assigns the checkpoint's tensors (no double allocation).
Each HF format fuses or splits q/k/v differently; `GPT` always holds one fused qkv laid out [Q; K; V].
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from leantune.checkpoint.io import atomic_dir, save_safetensors, write_json
from leantune.config import Config
from leantune.model import GPT

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
)
SHARD_BYTES = 5 * 2**30

# Per HF format: (layer-key prefix, {hf suffix -> our suffix}, {hf global key -> our key}).
_LLAMA_LAYER = {
    "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2", "self_attn.o_proj": "attn.proj",
    "mlp.gate_proj": "mlp.fc_1", "mlp.up_proj": "mlp.fc_2", "mlp.down_proj": "mlp.proj",
}
_LLAMA_GLOBAL = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
KEY_MAPS: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "llama": ("model.layers", _LLAMA_LAYER, _LLAMA_GLOBAL),
    "mistral": ("model.layers", _LLAMA_LAYER, _LLAMA_GLOBAL),
    "qwen2": ("model.layers", _LLAMA_LAYER, _LLAMA_GLOBAL),
    "phi": (
        "model.layers",
        {"input_layernorm": "norm_1", "self_attn.dense": "attn.proj", "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj"},
        {"model.embed_tokens": "transformer.wte", "model.final_layernorm": "transformer.ln_f", "lm_head": "lm_head"},
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        {"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2", "attention.query_key_value": "attn.qkv",
         "attention.dense": "attn.proj", "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"},
        {"gpt_neox.embed_in": "transformer.wte", "gpt_neox.final_layer_norm": "transformer.ln_f", "embed_out": "lm_head"},
    ),
    "falcon": (
        "transformer.h",
        {"input_layernorm": "norm_1", "ln_attn": "norm_1", "ln_mlp": "norm_2", "self_attention.query_key_value": "attn.qkv",
         "self_attention.dense": "attn.proj", "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"},
        {"transformer.word_embeddings": "transformer.wte", "transformer.ln_f": "transformer.ln_f", "lm_head": "lm_head"},
    ),
    "gpt2": (
        "transformer.h",
        {"ln_1": "norm_1", "ln_2": "norm_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
         "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"},
        {"transformer.wte": "transformer.wte", "transformer.wpe": "transformer.wpe", "transformer.ln_f": "transformer.ln_f",
         "lm_head": "lm_head"},
    ),
}
# Separate q/k/v projections in HF that GPT fuses into attn.qkv.
_SPLIT_QKV = {"llama", "mistral", "qwen2", "phi"}
# HF formats whose fused qkv is grouped per kv head: (groups, q_per_group + 2, head_size) rows.
_GROUPED_QKV = {"gpt_neox", "falcon"}
# Non-weight buffers some old checkpoints carry.
_IGNORED = re.compile(r"\.(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias)$")


def hf_to_ours(hf_sd: dict[str, torch.Tensor], config: Config,
               convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rename/reshape an HF state dict into GPT's keys. Unknown keys raise with the full list.

    `convert(our_key, tensor)` is applied to each tensor as soon as it is produced (copy to a device/dtype,
    quantize), so a fused q/k/v never waits in memory for the rest of the model.
    """
    prefix, layer_map, global_map = KEY_MAPS[config.hf_model_type]
    convert = convert or (lambda _, t: t)
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unexpected = []
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in hf_sd.items():
        if _IGNORED.search(key):
            continue
        m = layer_re.match(key)
        if m:
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if config.hf_model_type in _SPLIT_QKV and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                pending_qkv.setdefault((i, kind), {})[mod[-6]] = t
                continue
            if mod not in layer_map:
                unexpected.append(key)
                continue
            ours = layer_map[mod]
            if config.hf_model_type == "gpt2" and kind == "weight" and mod.startswith(("attn.", "mlp.")):
                t = t.t()  # GPT-2's Conv1D stores (in, out)
            if ours == "attn.qkv" and config.hf_model_type in _GROUPED_QKV:
                t = grouped_to_blocked(t, config)
            key = f"transformer.h.{i}.{ours}.{kind}"
            out[key] = convert(key, t)
            continue
        mod, _, kind = key.rpartition(".")
        if mod in global_map:
            ours_key = f"{global_map[mod]}.{kind}"
            out[ours_key] = convert(ours_key, t)
        else:
            unexpected.append(key)
    for (i, kind), parts in pending_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {i}: incomplete q/k/v {kind}s in checkpoint (found {sorted(parts)})")
        key = f"transformer.h.{i}.attn.qkv.{kind}"
        out[key] = convert(key, torch.cat([parts["q"], parts["k"], parts["v"]]))
    if unexpected:
        raise KeyError(f"checkpoint has {len(unexpected)} keys this {config.hf_model_type} model does not know: "
                       f"{unexpected[:20]}")
    return out


def ours_to_hf(sd: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_ours (tied lm_head dropped when the config ties embeddings)."""
    prefix, layer_map, global_map = KEY_MAPS[config.hf_model_type]
    inv_layer = {}
    for hf_mod, ours in layer_map.items():
        if hf_mod == "input_layernorm" and config.hf_model_type == "falcon" and not config.shared_attention_norm:
            continue  # falcon-40b style names its two norms ln_attn / ln_mlp
        if hf_mod in ("ln_attn", "ln_mlp") and config.shared_attention_norm:
            continue
        inv_layer.setdefault(ours, hf_mod)
    inv_global = {v: k for k, v in global_map.items()}
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in sd.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        m = layer_re.match(key)
        if m:
            i, mod, kind = m.group(1), m.group(2), m.group(3)
            if mod == "attn.qkv" and config.hf_model_type in _SPLIT_QKV:
                for name, part in zip("qkv", t.split(config.qkv_sizes)):
                    out[f"{prefix}.{i}.self_attn.{name}_proj.{kind}"] = part.clone()
                continue
            if mod == "attn.qkv" and config.hf_model_type in _GROUPED_QKV:
                t = blocked_to_grouped(t, config)
            if config.hf_model_type == "gpt2" and kind == "weight" and mod.startswith(("attn.", "mlp.")):
                t = t.t()
            out[f"{prefix}.{i}.{inv_layer[mod]}.{kind}"] = t.contiguous()
            continue
        mod, _, kind = key.rpartition(".")
        out[f"{inv_global[mod]}.{kind}"] = t
    return out


def grouped_to_blocked(t: torch.Tensor, config: Config) -> torch.Tensor:
    """HF fused qkv rows (ng, q_per_kv + 2, hs) -> [Q; K; V] rows. Works for weight (rows, in) and bias (rows,)."""
    ng, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // ng
    rest = t.shape[1:]
    g = t.reshape(ng, q_per_kv + 2, hs, *rest)  # (ng, q_per_kv + 2, hs, *in)
    q = g[:, :q_per_kv].reshape(ng * q_per_kv * hs, *rest)
    k = g[:, q_per_kv].reshape(ng * hs, *rest)
    v = g[:, q_per_kv + 1].reshape(ng * hs, *rest)
    return torch.cat([q, k, v])


def blocked_to_grouped(t: torch.Tensor, config: Config) -> torch.Tensor:
    ng, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // ng
    q, k, v = t.split(config.qkv_sizes)
    rest = t.shape[1:]
    q = q.reshape(ng, q_per_kv, hs, *rest)  # (ng, q_per_kv, hs, *in)
    k = k.reshape(ng, 1, hs, *rest)
    v = v.reshape(ng, 1, hs, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


# ---- reading ---------------------------------------------------------------------------------------------
def iter_hf_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from *.safetensors (sharded or not), else *.bin via torch.load(weights_only, mmap)."""
    from safetensors import safe_open

    files = weight_files(checkpoint_dir)
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()


def weight_files(checkpoint_dir: Path) -> list[Path]:
    d = Path(checkpoint_dir)
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        index = d / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as fh:
                names = sorted(set(json.load(fh)["weight_map"].values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shards listed but missing: {missing}")
            return [d / n for n in names]
        files = sorted(p for p in d.glob(pattern) if not p.name.startswith("training_"))
        if files:
            return files
    raise FileNotFoundError(f"{d}: no *.safetensors or *.bin weights found")


def load_hf_checkpoint(checkpoint_dir: str | Path, config: Config | None = None, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", model: GPT | None = None, quantize: str | None = None,
                       compute_dtype: torch.dtype | None = None) -> GPT:
    """Build GPT on the meta device and assign the folder's weights. Missing/unexpected keys raise clearly.

    With `quantize` (a leantune.quantize mode) the block linears are quantized one tensor at a time as they are
    read, from `compute_dtype` (default `dtype`, else float32), so the float model is never whole in memory.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or Config.from_checkpoint(checkpoint_dir)
    if model is None:
        with torch.device("meta"):
            model = GPT(config)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    if quantize:
        from leantune.quantize import check_mode, is_quantizable, quantize_weight

        check_mode(quantize)
        qdtype = compute_dtype or dtype or torch.float32

    def convert(key: str, t: torch.Tensor) -> torch.Tensor:
        if key not in expected:
            return t  # reported below
        if quantize and is_quantizable(key):
            return quantize_weight(t, quantize, device, qdtype)
        # copy=True: tensors read from safetensors may live in the file's memory map at unaligned offsets, which
        # made every matmul on CPU ~30% slower; fresh allocations are aligned and owned.
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype, copy=True)

    sd = hf_to_ours(dict(iter_hf_tensors(checkpoint_dir)), config, convert)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{checkpoint_dir}: weights do not match the architecture in config.json; "
                       f"missing {missing[:20]} ({len(missing)} total), unexpected {unexpected[:20]} ({len(unexpected)} total)")
    if quantize:
        from leantune.quantize import quantize_model

        quantized = {k: sd.pop(k) for k in list(sd) if is_quantizable(k)}
        model.load_state_dict(sd, strict=False, assign=True)  # biases first: QuantLinear takes the layer's bias
        quantize_model(model, quantize, qdtype, weights=quantized)
    else:
        model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


# ---- writing ---------------------------------------------------------------------------------------------
def hf_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict:
    """A transformers config.json for `config` (used when there is no original config.json to copy)."""
    c, mt = config, config.hf_model_type
    d: dict = {"model_type": mt, "vocab_size": c.padded_vocab_size, "tie_word_embeddings": c.tie_embeddings,
               "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": c.bos_token_id,
               "eos_token_id": c.eos_token_id}
    rope = {"rope_theta": c.rope_base}
    if mt in ("llama", "mistral", "qwen2"):
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[mt]
        d.update(architectures=[arch], hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
                 head_dim=c.head_size, rms_norm_eps=c.norm_eps, max_position_embeddings=c.block_size, hidden_act="silu",
                 **rope)
        if c.rope_scaling:
            rs = dict(c.rope_scaling)
            d["rope_scaling"] = {"rope_type": rs.pop("type"), **rs}
        if mt != "llama":
            d.update(sliding_window=c.sliding_window, use_sliding_window=c.sliding_window is not None)
    elif mt == "gpt_neox":
        d.update(architectures=["GPTNeoXForCausalLM"], hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, layer_norm_eps=c.norm_eps,
                 rotary_pct=c.rotary_percentage, max_position_embeddings=c.block_size,
                 use_parallel_residual=c.parallel_residual, hidden_act="gelu" if c.gelu_approximate == "none" else "gelu_new",
                 **rope)
    elif mt == "falcon":
        new_arch = not c.shared_attention_norm
        d.update(architectures=["FalconForCausalLM"], hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, num_kv_heads=c.n_query_groups, new_decoder_architecture=new_arch,
                 multi_query=c.n_query_groups == 1, parallel_attn=c.parallel_residual, bias=c.bias, alibi=False,
                 layer_norm_epsilon=c.norm_eps, ffn_hidden_size=c.intermediate_size, max_position_embeddings=c.block_size,
                 **rope)
    elif mt == "gpt2":
        d.update(architectures=["GPT2LMHeadModel"], n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                 n_positions=c.block_size, n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                 activation_function="gelu_new" if c.gelu_approximate == "tanh" else "gelu")
    elif mt == "phi":
        d.update(architectures=["PhiForCausalLM"], hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
                 layer_norm_eps=c.norm_eps, partial_rotary_factor=c.rotary_percentage,
                 max_position_embeddings=c.block_size, hidden_act="gelu_new" if c.gelu_approximate == "tanh" else "gelu",
                 **rope)
    return d


def save_hf_checkpoint(model: GPT, out_dir: str | Path, source_dir: str | Path | None = None,
                       dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write an HF folder transformers loads: config.json (copied from source_dir when given), safetensors
    shards + index, and the tokenizer/generation files of source_dir. Atomic: the folder appears complete or not at all."""
    out_dir = Path(out_dir)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
          for k, v in model.state_dict().items()}
    hf_sd = ours_to_hf(sd, model.config)
    src_cfg = Path(source_dir) / "config.json" if source_dir else None
    if src_cfg is not None and src_cfg.is_file():
        with open(src_cfg, encoding="utf-8") as fh:
            cfg_dict = json.load(fh)
        written = dtype or next((t.dtype for t in hf_sd.values() if t.is_floating_point()), torch.float32)
        cfg_dict["torch_dtype"] = str(written).removeprefix("torch.")  # describe the weights actually written
        cfg_dict.pop("dtype", None)
        cfg_dict["tie_word_embeddings"] = model.config.tie_embeddings  # a merged head LoRA unties
    else:
        cfg_dict = hf_config_dict(model.config, dtype or next(iter(sd.values())).dtype)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "config.json", cfg_dict)
        shards = _shard(hf_sd, shard_bytes)
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in hf_sd.values())
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        if source_dir:
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
    return out_dir


def _shard(sd: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards
