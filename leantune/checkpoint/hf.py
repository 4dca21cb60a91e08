"""Hugging Face model folders in and out: key maps between HF layouts and `GPT`, loading and saving.

Loading builds the model on the meta device and assigns the checkpoint's tensors (no double allocation).
Each HF format fuses or splits q/k/v differently (its `leantune.models.decoder.families` record says how); `GPT` always holds one
fused qkv laid out [Q; K; V].
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from leantune.checkpoint.io import atomic_dir, check_regular_file, save_safetensors, write_json
from leantune.checkpoint.safe_pickle import load_tensor_dict
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import config_from_checkpoint, config_to_hf, family_of
from leantune.models.decoder.model import GPT
from leantune.models.quantize import check_mode, is_quantizable, quantize_model, quantize_weight

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
)
SHARD_BYTES = 5 * 2**30

# Non-weight buffers some old checkpoints carry.
_IGNORED = re.compile(r"\.(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias)$")


def hf_to_ours(hf_sd: dict[str, torch.Tensor], config: Config,
               convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rename/reshape an HF state dict into GPT's keys. Unknown keys raise with the full list.

    `convert(our_key, tensor)` is applied to each tensor as soon as it is produced (copy to a device/dtype,
    quantize), so a fused q/k/v never waits in memory for the rest of the model.
    """
    family = family_of(config)
    convert = convert or (lambda _, t: t)
    qkv_part = {mod: "qkv"[j] for j, mod in enumerate(family.qkv_modules)}  # "split" layout only
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unexpected = []
    layer_re = re.compile(rf"^{re.escape(family.layer_prefix)}\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in hf_sd.items():
        if _IGNORED.search(key):
            continue
        m = layer_re.match(key)
        if m:
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in qkv_part:
                pending_qkv.setdefault((i, kind), {})[qkv_part[mod]] = t
                continue
            if mod not in family.layer_map:
                unexpected.append(key)
                continue
            ours = family.layer_map[mod]
            if family.transposed_linears and kind == "weight" and ours.startswith(("attn.", "mlp.")):
                t = t.t()  # Conv1D stores (in, out)
            if ours == "attn.qkv" and family.qkv_layout == "grouped":
                t = grouped_to_blocked(t, config)
            key = f"transformer.h.{i}.{ours}.{kind}"
            out[key] = convert(key, t)
            continue
        mod, _, kind = key.rpartition(".")
        if mod in family.global_map:
            ours_key = f"{family.global_map[mod]}.{kind}"
            out[ours_key] = convert(ours_key, t)
        else:
            unexpected.append(key)
    for (i, kind), parts in pending_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {i}: incomplete q/k/v {kind}s in checkpoint (found {sorted(parts)})")
        key = f"transformer.h.{i}.attn.qkv.{kind}"
        out[key] = convert(key, torch.cat([parts["q"], parts["k"], parts["v"]]))
    if unexpected:
        raise KeyError(f"checkpoint has {len(unexpected)} keys this {family.model_type} model does not know: "
                       f"{unexpected[:20]}")
    return out


def ours_to_hf(sd: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_ours (tied lm_head dropped when the config ties embeddings)."""
    family = family_of(config)
    prefix, inv_layer = family.layer_prefix, family.hf_layer_names(config)
    inv_global = {v: k for k, v in family.global_map.items()}
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in sd.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        m = layer_re.match(key)
        if m:
            i, mod, kind = m.group(1), m.group(2), m.group(3)
            if mod == "attn.qkv" and family.qkv_layout == "split":
                for hf_mod, part in zip(family.qkv_modules, t.split(config.qkv_sizes)):
                    out[f"{prefix}.{i}.{hf_mod}.{kind}"] = part.clone()
                continue
            if mod == "attn.qkv" and family.qkv_layout == "grouped":
                t = blocked_to_grouped(t, config)
            if family.transposed_linears and kind == "weight" and mod.startswith(("attn.", "mlp.")):
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
    """Yield (key, tensor) from *.safetensors (sharded or not), else *.bin via torch.load(weights_only, mmap when
    the file is torch's zip format). A damaged file (truncated download, interrupted copy) is reported by name, and a
    .bin that pickles anything but named tensors is refused (UntrustedFileError), never run."""
    files = weight_files(checkpoint_dir)
    for f in files:
        check_regular_file(f)  # a FIFO would block the reader forever
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            else:
                yield from load_tensor_dict(f, mmap=_is_zip(f)).items()
        except (SafetensorError, RuntimeError, EOFError, OSError) as e:
            if isinstance(e, FileNotFoundError | PermissionError):
                raise
            raise ValueError(f"{f}: cannot read the weights ({str(e).splitlines()[0][:200]}); the file is damaged or "
                             "incomplete: download or export it again") from e


def index_shards(index: Path) -> list[str]:
    """The shard file names a weight index lists; each must be a plain name in the index's own folder."""
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a weight index (a JSON object with a 'weight_map' of file names): "
                         f"{str(e)[:120]}") from e
    bad = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or "/" in n or "\\" in n]
    if bad:
        raise ValueError(f"{index}: shard names {bad[:3]} are not plain file names in the model folder")
    return names


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (mmap-able); older .bin files are a bare pickle that torch.load reads whole."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def weight_files(checkpoint_dir: Path) -> list[Path]:
    d = Path(checkpoint_dir)
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        index = d / index_name
        if index.is_file():
            names = index_shards(index)
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

    With `quantize` (a leantune.models.quantize mode) the block linears are quantized one tensor at a time as they are
    read, from `compute_dtype` (default `dtype`, else float32), so the float model is never whole in memory.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or config_from_checkpoint(checkpoint_dir)
    if model is None:
        with torch.device("meta"):
            model = GPT(config)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    if quantize:
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
    """A transformers config.json for `config` (used when there is no original config.json to copy); refuses a
    Config its family's config.json cannot describe."""
    return config_to_hf(config, str(dtype).removeprefix("torch."))


def save_hf_checkpoint(model: GPT, out_dir: str | Path, source_dir: str | Path | None = None,
                       dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, kind: str | None = None) -> Path:
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
    return write_hf_folder(out_dir, cfg_dict, hf_sd, source_dir, shard_bytes, kind)


def write_hf_folder(out_dir: str | Path, cfg_dict: dict, hf_sd: dict[str, torch.Tensor], source_dir: str | Path | None,
                    shard_bytes: int = SHARD_BYTES, kind: str | None = None) -> Path:
    """Atomically write config.json, the HF-named tensors as safetensors shards (+ index when several) and
    source_dir's tokenizer/generation files: the folder layout of every model kind."""
    with atomic_dir(out_dir, kind=kind) as tmp:  # kind: an output the user named gets leantune's marker
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
    return Path(out_dir)


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
