"""Model kinds: the decoder-only `GPT` and the encoder-decoder `T5`, each one `ModelKind` record beside `Method` and
`Family`.

A kind is what a command needs to know about a model beyond its weights: how it is recognised in a folder, loaded
and saved, where its blocks are, how it decodes greedily, what an adapter's shape check reads, and which features it
lacks (refused before anything loads, in one line naming the flag and the kind). The kind is resolved once, from
config.json (`kind_of_folder`) or from a built model (`kind_of`); nothing else in leantune tests a model's class or
model_type. Adding a kind is one record in `KINDS` (tests/test_model_kinds.py adds a test double this way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leantune.checkpoint.hf import (
    blocked_to_grouped,
    grouped_to_blocked,
    hf_to_ours,
    iter_hf_tensors,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from leantune.checkpoint.t5_hf import hf_name, load_t5_checkpoint, save_t5_checkpoint, t5_from_hf_state_dict
from leantune.decode.generate import greedy_batch
from leantune.decode.seq2seq import pad_inputs, t5_generate
from leantune.models.decoder.families import config_from_checkpoint, family_of
from leantune.models.decoder.model import GPT
from leantune.models.quantize import check_mode, quantize_model
from leantune.models.t5.model import T5, T5Config

# ---- capabilities: what a command may ask of a kind (the flag that asks, for the one-line refusal) ----------------
BNB_BASE = "bnb_base"
WEIGHT_ONLY = "weight_only"
SERVE = "serve"
LM_EVAL = "lm_eval"
ACTIVATION_CHECKPOINTING = "activation_checkpointing"
COMPILE = "compile"
DECODE_COMPILE = "decode_compile"
FSDP = "fsdp"
GGUF = "gguf"
CAPABILITY_FLAGS = {
    BNB_BASE: "--quantize bnb.*", WEIGHT_ONLY: "--quantize int8/int4", SERVE: "leantune serve",
    LM_EVAL: "--tasks", ACTIVATION_CHECKPOINTING: "--train.activation_checkpointing true",
    COMPILE: "--train.compile true", DECODE_COMPILE: "--compile true", FSDP: "--devices N (FSDP2)",
    GGUF: "export --format gguf",
}


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class PeftSite:
    """One module HF PEFT can adapt, as PEFT names it and as leantune holds it."""

    hf: str  # the HF module path (a PEFT key is base_model.model.<hf>.<tensor>)
    ours: str  # our module path (`model.get_submodule`)
    rows: tuple[int, int] | None  # the output rows of `ours` this HF module is (one of a split q/k/v); None: all
    targets: tuple[str, ...]  # the leantune targets (query, ..., head) that select it
    to_hf: Callable[[torch.Tensor], torch.Tensor] = _same  # our output-row order -> the HF module's (dim 0)
    from_hf: Callable[[torch.Tensor], torch.Tensor] = _same


@dataclass(frozen=True)
class PeftLayout:
    """How a kind's modules appear in HF PEFT adapter folders (read by `leantune.peft.peft_format`)."""

    task_type: str  # PEFT's task_type: CAUSAL_LM, SEQ_2_SEQ_LM
    sites: Callable[[nn.Module], list[PeftSite]]  # every linear PEFT can adapt (the head's aliases after its name)
    fan_in_fan_out: Callable[[Any], bool]  # config -> linears stored (in, out), as transformers' Conv1D
    prompt_fields: Callable[[Any], dict[str, int]]  # config -> token_dim, num_transformer_submodules, heads, layers


@dataclass(frozen=True)
class ModelKind:
    """One model kind: its classes, its place in an HF folder, and what it can do."""

    name: str  # "decoder", "encoder-decoder": the word messages use
    model_class: type[nn.Module]
    read_config: Callable[[Path], Any]  # HF folder -> the kind's config (before any weight loads)
    seq2seq: bool  # batches carry encoder inputs and decoder labels; prompts go to an encoder
    matches: Callable[[dict[str, Any]], bool]  # config.json -> is this kind
    load: Callable[..., nn.Module]  # (folder, dtype, device, quantize, compute_dtype) -> model in train mode
    save: Callable[..., Path]  # (model, out_dir, source_dir, dtype, kind) -> folder
    state_from_hf: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]  # HF tensors -> our names
    blocks: Callable[[nn.Module], list[nn.Module]]  # every transformer block (checkpointing, compile, FSDP wrap)
    embedding: Callable[[nn.Module], nn.Embedding]  # the token embedding (virtual tokens live beside it)
    tied_names: tuple[str, str]  # (embedding, head) parameter names when the two are tied
    ties: Callable[[Any], bool]  # config -> the head is the embedding matrix
    architecture: Callable[[nn.Module], dict[str, Any]]  # the shape facts an adapter's manifest records
    decoder_start_id: Callable[[Any], int | None]  # config -> first decoder token (None: a decoder continues)
    context_length: Callable[[Any], int | None]  # config -> the longest sequence it was built for (None: no limit)
    greedy: Callable[..., list[list[int]]]  # (model, prompts, max_new_tokens, eos_ids, pad_id) -> new tokens
    lacks: Mapping[str, str] = field(default_factory=dict)  # capability or "method:<name>" -> why it is missing
    peft: PeftLayout | None = None  # its layout in HF PEFT folders; None: PEFT has none

    def check(self, capability: str, flag: str | None = None) -> None:
        """Refuse a capability this kind lacks: one line naming the flag, the kind and why."""
        why = self.lacks.get(capability)
        if why is not None:
            what = flag or CAPABILITY_FLAGS.get(capability, capability.removeprefix("method:"))
            raise ValueError(f"{what} is not available for {self.name} models ({self.model_class.__name__}): {why}")

    def check_method(self, method: str) -> None:
        self.check(f"method:{method}", f"finetune {method}")

    def config_of(self, checkpoint_dir: str | Path) -> Any:
        return self.read_config(Path(checkpoint_dir))


def read_config_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF folder ({} when absent or unreadable: the loader that needs it says why)."""
    try:
        with open(Path(checkpoint_dir) / "config.json", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


# ---- the decoder -----------------------------------------------------------------------------------------------------
def _decoder_architecture(model: nn.Module) -> dict[str, Any]:
    c = model.config
    return {"model_type": c.hf_model_type, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
            "n_query_groups": c.n_query_groups, "head_size": c.head_size,
            "intermediate_size": c.intermediate_size, "vocab_size": c.padded_vocab_size}


_QKV = ("query", "key", "value")


def _decoder_peft_sites(model: nn.Module) -> list[PeftSite]:
    """A decoder's block linears and head under the family's HF names: a split q/k/v is three sites over rows of our
    fused qkv, a fused HF qkv one site (rows regrouped per kv head where the family groups them)."""
    cfg, fam = model.config, family_of(model.config)
    q, k, v = cfg.qkv_sizes
    grouped = dict(to_hf=partial(blocked_to_grouped, config=cfg),
                   from_hf=partial(grouped_to_blocked, config=cfg)) if fam.qkv_layout == "grouped" else {}
    sites = []
    for i in range(cfg.n_layer):
        hf, ours = f"{fam.layer_prefix}.{i}.", f"transformer.h.{i}."
        for mod, names in fam.linear_modules().items():
            if mod == "attn.qkv" and fam.qkv_layout == "split":
                sites += [PeftSite(hf + n, ours + mod, rows, (t,))
                          for n, rows, t in zip(names, ((0, q), (q, q + k), (q + k, q + k + v)), _QKV)]
            else:
                targets = _QKV if mod == "attn.qkv" else ("projection",) if mod == "attn.proj" else ("mlp",)
                sites.append(PeftSite(hf + names[0], ours + mod, None, targets, **(grouped if mod == "attn.qkv" else {})))
    heads = dict.fromkeys(h for h in (fam.peft_head_module(), fam.head_module, fam.head_module_before_v5) if h)
    return sites + [PeftSite(h, "lm_head", None, ("head",)) for h in heads]


DECODER = ModelKind(
    name="decoder", model_class=GPT, read_config=config_from_checkpoint, seq2seq=False,
    matches=lambda cfg: cfg.get("model_type") != "t5",  # every family's model_type (the loader names unknown ones)
    load=lambda folder, dtype=None, device="cpu", quantize=None, compute_dtype=None: load_hf_checkpoint(
        folder, dtype=dtype, device=device, quantize=quantize, compute_dtype=compute_dtype),
    save=save_hf_checkpoint,
    state_from_hf=hf_to_ours,
    blocks=lambda model: list(model.transformer.h),
    embedding=lambda model: model.transformer.wte,
    tied_names=("transformer.wte.weight", "lm_head.weight"),
    ties=lambda config: config.tie_embeddings,
    architecture=_decoder_architecture,
    decoder_start_id=lambda config: None,
    context_length=lambda config: config.block_size,
    greedy=lambda model, prompts, max_new_tokens, eos_ids, pad_id: greedy_batch(
        model, prompts, max_new_tokens, eos_ids, pad_id=pad_id),
    peft=PeftLayout(
        task_type="CAUSAL_LM", sites=_decoder_peft_sites,
        fan_in_fan_out=lambda config: family_of(config).transposed_linears,
        prompt_fields=lambda c: dict(token_dim=c.n_embd, num_transformer_submodules=1, num_attention_heads=c.n_head,
                                     num_layers=c.n_layer)),
)


# ---- the encoder-decoder ---------------------------------------------------------------------------------------------
def _load_t5(folder, dtype=None, device="cpu", quantize=None, compute_dtype=None) -> T5:
    model = load_t5_checkpoint(folder, dtype=dtype, device=device).train()
    if quantize:  # float first, then each block linear in turn (T5 checkpoints are small beside the decoders)
        check_mode(quantize)
        quantize_model(model, quantize, compute_dtype or dtype or torch.float32)
    return model


def _t5_architecture(model: nn.Module) -> dict[str, Any]:
    c = model.config
    return {"model_type": "t5", "num_layers": c.num_layers, "num_decoder_layers": c.num_decoder_layers,
            "d_model": c.d_model, "num_heads": c.num_heads, "d_kv": c.d_kv, "d_ff": c.d_ff,
            "is_gated_act": c.is_gated_act, "vocab_size": c.vocab_size}


def _t5_greedy(model: T5, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
               pad_id: int) -> list[list[int]]:
    """The encoder reads each prompt, the decoder starts from its start token (dropped from the result)."""
    ids, mask = pad_inputs(prompts, pad_id, device=next(model.parameters()).device)  # (B, S) right-padded
    out = t5_generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)
    return [row[1:] for row in out.tolist()]


_T5_LINEAR = re.compile(r"(?:encoder|decoder)\.block\.\d+\.(?:attn|cross_attn|ff)\.(q|k|v|o|wi|wi_0|wi_1|wo)")
_T5_TARGETS = {"q": ("query",), "k": ("key",), "v": ("value",), "o": ("projection",), "wo": ("mlp",)}


def _t5_peft_sites(model: nn.Module) -> list[PeftSite]:
    """A T5's linears, one PEFT module each, under transformers' names (`hf_name`)."""
    sites = [PeftSite(hf_name(n), n, None, _T5_TARGETS.get(m.group(1), ("mlp",)))
             for n, _ in model.named_modules() if (m := _T5_LINEAR.fullmatch(n))]
    return sites + [PeftSite("lm_head", "lm_head", None, ("head",))]


_NO_PREFIX_GATE = ("LLaMA-Adapter gates a learned prompt into the top decoder self-attention layers of a decoder-only "
                   "model; it has no published definition for an encoder-decoder (peft has none either): use lora, "
                   "ia3, prompt or prefix")
T5_KIND = ModelKind(
    name="encoder-decoder", model_class=T5, read_config=lambda folder: T5Config.from_hf(read_config_json(folder)),
    seq2seq=True,
    matches=lambda cfg: cfg.get("model_type") == "t5",
    load=_load_t5,
    save=save_t5_checkpoint,
    state_from_hf=lambda hf_sd, config: t5_from_hf_state_dict(hf_sd, config)[0],
    blocks=lambda model: [*model.encoder.block, *model.decoder.block],
    embedding=lambda model: model.shared,
    tied_names=("shared.weight", "lm_head.weight"),
    ties=lambda config: config.tie_word_embeddings,
    architecture=_t5_architecture,
    decoder_start_id=lambda config: config.decoder_start_token_id,
    context_length=lambda config: config.extra.get("n_positions"),  # relative positions: a trained length, if said
    greedy=_t5_greedy,
    peft=PeftLayout(  # PEFT sizes a seq2seq prompt for the encoder and the decoder and uses the encoder's rows
        task_type="SEQ_2_SEQ_LM", sites=_t5_peft_sites, fan_in_fan_out=lambda config: False,
        prompt_fields=lambda c: dict(token_dim=c.d_model, num_transformer_submodules=2, num_attention_heads=c.num_heads,
                                     num_layers=c.num_layers)),
    lacks={
        WEIGHT_ONLY: "the int8/int4 decode kernels serve the decoder's one-token steps; T5 decodes in float or on a "
                     "bitsandbytes base (--quantize bnb.nf4)",
        DECODE_COMPILE: "the compiled decode step is built for the decoder's static KV cache; drop --compile",
        FSDP: "multi-process training shards the decoder's blocks; train T5 in one process",
        GGUF: "llama.cpp's GGUF names decoder tensors; use --format hf or --format peft",
        "method:adapter": _NO_PREFIX_GATE,
        "method:adapter_v2": _NO_PREFIX_GATE,
        "method:prefix_tuning": "leantune's prefix keys and values extend the decoder's self-attention cache only; "
                                "on T5 use prompt_tuning or p_tuning",
    },
)

KINDS: tuple[ModelKind, ...] = (T5_KIND, DECODER)  # checked in order: the first whose `matches` says yes


def kind_of_folder(checkpoint_dir: str | Path) -> ModelKind:
    """The kind of the model an HF folder holds, from its config.json alone (before any weight loads)."""
    cfg = read_config_json(checkpoint_dir)
    return next(k for k in KINDS if k.matches(cfg))


def kind_of(model: nn.Module) -> ModelKind:
    """The kind of a built model."""
    for k in KINDS:
        if isinstance(model, k.model_class):
            return k
    raise TypeError(f"{type(model).__name__} is not a model kind leantune knows ({', '.join(k.name for k in KINDS)})")


# ---- the questions callers ask, answered from the record ----------------------------------------------------------
def is_seq2seq(model: nn.Module) -> bool:
    """True for an encoder-decoder model (its batches carry encoder inputs and decoder labels)."""
    return kind_of(model).seq2seq


def decoder_start_id(model: nn.Module) -> int | None:
    """The first decoder input token of an encoder-decoder model; None for a decoder-only model (what
    `DataModule.connect(decoder_start_id=...)` takes)."""
    return kind_of(model).decoder_start_id(model.config)


def folder_decoder_start_id(checkpoint_dir: str | Path) -> int | None:
    """`decoder_start_id` of the model an HF folder holds, read from config.json before any weight loads (so data
    can be checked first); None for a decoder-only model."""
    kind = kind_of_folder(checkpoint_dir)
    return kind.decoder_start_id(kind.config_of(checkpoint_dir)) if kind.seq2seq else None


def architecture(model: nn.Module) -> dict[str, Any]:
    """The shape facts an adapter depends on (recorded in its manifest, checked before it touches a base)."""
    return kind_of(model).architecture(model)


def blocks(model: nn.Module) -> list[nn.Module]:
    return kind_of(model).blocks(model)


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A model of the folder's kind, in train mode (callers set eval)."""
    kind = kind_of_folder(checkpoint_dir)
    if quantize and quantize.startswith("bnb."):
        kind.check(BNB_BASE, f"--quantize {quantize}")
    return kind.load(checkpoint_dir, dtype=dtype, device=device, quantize=quantize, compute_dtype=compute_dtype)


def save_model(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, kind: str | None = None) -> Path:
    """Write `model` as an HF folder of its kind (tokenizer files copied from source_dir; kind: the output marker of
    a folder the user named, see `leantune.checkpoint.io.claim_output`)."""
    return kind_of(model).save(model, out_dir, source_dir=source_dir, dtype=dtype, kind=kind)


def read_model_state(folder: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """An HF folder's tensors under `model`'s parameter names, a tied head listed once under the name
    `named_parameters` uses (to copy a full finetune's weights back into a built model)."""
    kind = kind_of(model)
    sd = kind.state_from_hf(dict(iter_hf_tensors(Path(folder))), model.config)
    if kind.ties(model.config):  # one tensor, two names: keep the one named_parameters uses
        params = dict(model.named_parameters())
        found = [sd.pop(n) for n in kind.tied_names if n in sd]
        kept = next((n for n in kind.tied_names if n in params), None)
        if found and kept:
            sd[kept] = found[0]
    return sd


def greedy_outputs(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                   pad_id: int) -> list[list[int]]:
    """Greedy new tokens per prompt, for any kind: a decoder continues its prompt; an encoder-decoder reads it with
    its encoder and decodes from its start token."""
    return kind_of(model).greedy(model, prompts, max_new_tokens, eos_ids, pad_id)
