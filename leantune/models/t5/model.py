"""The encoder-decoder model kind: T5 v1.0 and v1.1 / flan-t5, config-driven like `GPT`.

What differs from the decoder `GPT`, and why it lives in its own small file:
- two stacks (a bidirectional encoder, a causal decoder with cross-attention over the encoder output) and one shared
  token embedding;
- no absolute positions: each stack's first block owns a learned bias per (relative-distance bucket, head), computed
  once per forward and added to the attention scores of every block of that stack; attention scores are not scaled
  by 1/sqrt(d_kv) (the scale is folded into the weights);
- a scale-only RMS norm without bias ("T5LayerNorm"), pre-norm residual blocks;
- the feed-forward is ReLU (v1.0) or gated GELU (v1.1 / flan-t5), a config field, never a name check;
- the head is tied to the shared embedding (v1.0, which then rescales the decoder output by d_model**-0.5) or not.

Module names are simple and stable, one per HF module (`encoder.block.N.attn.q`, `decoder.block.N.cross_attn.k`,
`...ff.wi_0`), so PEFT methods swap `nn.Linear`s by position and `leantune.checkpoint.t5_hf` maps keys 1:1.
Generation state lives in an explicit `T5DecodeCache` (self-attention keys/values written step by step, the
cross-attention keys/values of the encoder output computed once), so beam search can reorder it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models.ops import Dropout
from leantune.models.t5.presets import find_t5_preset


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU written out as transformers' NewGELUActivation does ("gated-gelu" runs it): F.gelu's fused
    tanh approximation rounds differently (~1e-5 on logits), and parity here is exact."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": gelu_new,
    "silu": F.silu,
}

# config.json keys `T5Config` models; everything else is kept in `extra` for a faithful round trip.
_MODELED = {
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj",
    "dense_act_fn", "is_gated_act", "tie_word_embeddings", "scale_decoder_outputs", "dropout_rate", "pad_token_id",
    "eos_token_id", "decoder_start_token_id", "model_type", "architectures", "is_encoder_decoder", "torch_dtype", "dtype",
}


@dataclass
class T5Config:
    name: str = ""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    """Width of one attention head; T5 does not tie it to d_model / num_heads."""
    d_ff: int = 2048
    num_layers: int = 6
    """Encoder blocks."""
    num_decoder_layers: int | None = None
    """Decoder blocks (default: num_layers)."""
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    """Relative distances at or beyond this share the last bucket."""
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    """Feed-forward activation, a key of `ACTIVATIONS` ("gelu_new" is the tanh approximation)."""
    is_gated_act: bool = False
    """Gated feed-forward wo(act(wi_0 x) * wi_1 x) (v1.1, flan-t5) instead of wo(act(wi x)) (v1.0)."""
    tie_word_embeddings: bool = True
    """The LM head is the shared embedding matrix."""
    scale_decoder_outputs: bool | None = None
    """Multiply the decoder output by d_model**-0.5 before the head (default: tie_word_embeddings, as transformers)."""
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    """First decoder input token (T5: the pad token)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """config.json fields we do not model (task_specific_params, n_positions, ...), kept for the round trip."""

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 feed-forward activation {self.dense_act_fn!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")

    @property
    def inner_dim(self) -> int:
        """Output width of q/k/v (num_heads * d_kv)."""
        return self.num_heads * self.d_kv

    @property
    def eos_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> T5Config:
        return cls(**{**find_t5_preset(name), **overrides})

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> T5Config:
        """Read a transformers T5 config.json dict, with transformers' defaults for absent keys.

        `feed_forward_proj` is "{act}" or "gated-{act}", and "gated-gelu" means the tanh GELU ("gelu_new").
        `tie_word_embeddings` defaults to true (T5 v1.0 files omit it). transformers 5 writes the rescale rule
        separately as `scale_decoder_outputs` (and always writes tie_word_embeddings true, then unties a head that
        the checkpoint stores with other values: `leantune.checkpoint.t5_hf` does the same).
        """
        if cfg.get("model_type", "t5") != "t5":
            raise ValueError(f"not a T5 config.json (model_type {cfg.get('model_type')!r})")
        proj = cfg.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"config.json feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        tie = bool(cfg.get("tie_word_embeddings", True))
        num_layers = cfg.get("num_layers", 6)
        return cls(
            vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512), d_kv=cfg.get("d_kv", 64),
            d_ff=cfg.get("d_ff", 2048), num_layers=num_layers,
            num_decoder_layers=cfg.get("num_decoder_layers") or num_layers, num_heads=cfg.get("num_heads", 8),
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6), dense_act_fn=act, is_gated_act=len(parts) == 2,
            tie_word_embeddings=tie, scale_decoder_outputs=bool(cfg.get("scale_decoder_outputs", tie)),
            dropout_rate=cfg.get("dropout_rate", 0.1), pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=cfg.get("eos_token_id", 1),
            decoder_start_token_id=cfg.get("decoder_start_token_id", cfg.get("pad_token_id", 0)),
            extra={k: v for k, v in cfg.items() if k not in _MODELED},
        )

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json transformers reads back into the same architecture (4.x and 5.x)."""
        act = self.dense_act_fn
        if self.is_gated_act:
            if act == "gelu":
                raise ValueError("a gated exact-GELU feed-forward has no config.json spelling ('gated-gelu' means "
                                 "the tanh approximation, gelu_new)")
            proj = "gated-gelu" if act == "gelu_new" else f"gated-{act}"
        else:
            proj = act
        out = {**self.extra, "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
               "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff,
               "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers,
               "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
               "relative_attention_max_distance": self.relative_attention_max_distance,
               "layer_norm_epsilon": self.layer_norm_epsilon, "feed_forward_proj": proj, "dense_act_fn": act,
               "is_gated_act": self.is_gated_act, "tie_word_embeddings": self.tie_word_embeddings,
               "scale_decoder_outputs": self.scale_decoder_outputs, "dropout_rate": self.dropout_rate,
               "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
               "decoder_start_token_id": self.decoder_start_token_id, "is_encoder_decoder": True}
        if dtype is not None:
            out["torch_dtype"] = dtype
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> T5Config:
        return replace(self, **changes)


# ---- the model ---------------------------------------------------------------------------------------------------
class T5(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        # Virtual tokens (prompt tuning, P-tuning), set by a PEFT method: `embeddings()` (P, d_model) prepended to
        # every encoder input, as PEFT does for seq2seq models (relative positions: nothing else shifts).
        self.virtual: nn.Module | None = None

    @property
    def n_virtual(self) -> int:
        return 0 if self.virtual is None else self.virtual.n_virtual

    def encoder_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding mask over the encoder's outputs: attention_mask (B, S) with the P virtual positions (always
        attended to) in front, (B, P + S); None stays None (no padding)."""
        if attention_mask is None or self.virtual is None:
            return attention_mask
        return torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.n_virtual), attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, S), decoder_input_ids (B, T) -> logits (B, T, V), or with return_hidden the decoder output
        (B, T, d_model) before the head (`head` turns it into logits).

        attention_mask (B, S): 1 for real encoder tokens, 0 for padding. decoder_attention_mask (B, T): the same for
        decoder inputs (on top of the causal mask). Teacher forcing: decoder_input_ids = shift_right(labels).
        """
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, self.encoder_mask(attention_mask),
                           decoder_attention_mask=decoder_attention_mask, return_hidden=return_hidden)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder output (B, S, d_model), or (B, P + S, d_model) with P virtual tokens in front
        (pass `encoder_mask(attention_mask)` with it to `decode` / `new_cache`)."""
        x = self.shared(input_ids)  # (B, S, C)
        if self.virtual is not None:
            prompt = self.virtual.embeddings().to(x.dtype)  # (P, C)
            x = torch.cat([prompt.expand(x.shape[0], -1, -1), x], dim=1)  # (B, P + S, C)
            attention_mask = self.encoder_mask(attention_mask)
        S = x.shape[1]
        bias = self.encoder.position_bias(S, S, 0, input_ids.device)  # (1, H, S, S)
        if attention_mask is not None:
            bias = _masked(bias, attention_mask[:, None, None, :].bool())  # (B, H, S, S)
        return self.encoder(x, bias)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor | None = None,
               encoder_mask: torch.Tensor | None = None, *, cache: T5DecodeCache | None = None,
               decoder_attention_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, V) (or the pre-head output with return_hidden).

        Without a cache the whole decoder sequence is processed against `encoder_hidden` (B, S, C) and its mask.
        With a cache (see `new_cache`) the T new tokens continue at position cache.length, attend to the cached
        keys/values and the cached cross-attention keys/values, and are appended to the cache.
        decoder_attention_mask (B, past + T): 1 for real decoder tokens, over all keys (cache included).
        """
        T = decoder_input_ids.shape[1]
        past = 0 if cache is None else cache.length
        S = past + T
        device = decoder_input_ids.device
        bias = self.decoder.position_bias(T, S, past, device)  # (1, H, T, S)
        if T > 1 or decoder_attention_mask is not None:  # one new token may attend to every key: nothing to mask
            allowed = torch.arange(S, device=device)[None, :] <= torch.arange(past, S, device=device)[:, None]
            allowed = allowed[None, None]  # (1, 1, T, S) causal
            if decoder_attention_mask is not None:
                allowed = allowed & decoder_attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
            bias = _masked(bias, allowed)
        if cache is None:
            if encoder_hidden is None:
                raise ValueError("decode needs encoder_hidden (or a cache made by new_cache)")
            cross_bias = _cross_bias(encoder_mask, encoder_hidden.dtype)
        else:
            cross_bias = cache.cross_bias
        x = self.decoder(self.shared(decoder_input_ids), bias, encoder_hidden, cross_bias, cache)
        if cache is not None:
            cache.length = S
        return x if return_hidden else self.head(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (..., d_model) -> logits (..., V), with v1.0's d_model**-0.5 rescale where configured."""
        return self.lm_head(self.head_input(hidden))

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What `lm_head` is applied to: the decoder output, rescaled by d_model**-0.5 where configured (the fused
        training loss takes this and `lm_head` apart, never forming all the logits)."""
        return hidden * (self.config.d_model ** -0.5) if self.config.scale_decoder_outputs else hidden

    def new_cache(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None,
                  max_length: int) -> T5DecodeCache:
        """A decoding cache for up to `max_length` decoder tokens: each decoder block's cross-attention keys/values
        of `encoder_hidden` (B, S, C) are computed here, once per generation."""
        B = encoder_hidden.shape[0]
        cfg = self.config
        cross = [blk.cross_attn.project_kv(encoder_hidden) for blk in self.decoder.block]
        shape = (B, cfg.num_heads, max_length, cfg.d_kv)
        dtype, device = cross[0][0].dtype, cross[0][0].device
        return T5DecodeCache(
            self_k=[torch.zeros(shape, dtype=dtype, device=device) for _ in cross],
            self_v=[torch.zeros(shape, dtype=dtype, device=device) for _ in cross],
            cross_k=[k for k, _ in cross], cross_v=[v for _, v in cross],
            cross_bias=_cross_bias(encoder_mask, encoder_hidden.dtype),
        )

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs from labels (B, T): [start, labels[:-1]] with -100 replaced by pad."""
        out = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, self.config.pad_token_id)


def _masked(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The position bias where attention is allowed, the dtype's minimum elsewhere (as transformers: a row with every
    key masked stays finite instead of NaN)."""
    return torch.where(allowed, bias, torch.finfo(bias.dtype).min)


def _cross_bias(encoder_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Encoder padding as an additive float mask (B, 1, 1, S) for cross-attention (which has no position bias)."""
    if encoder_mask is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=encoder_mask.device)
    return _masked(zero, encoder_mask[:, None, None, :].bool())


@dataclass
class T5DecodeCache:
    """Per decoder block: self-attention keys/values (B, H, max_length, d_kv) filled up to `length`, and the
    cross-attention keys/values (B, H, S, d_kv) of the encoder output, with the encoder padding as `cross_bias`."""

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    cross_bias: torch.Tensor | None
    length: int = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, H, T, d_kv) at positions length..length+T-1; return all filled ones."""
        end = self.length + k.shape[2]
        if end > self.self_k[layer].shape[2]:
            raise ValueError(f"decoder cache holds {self.self_k[layer].shape[2]} tokens; {end} requested")
        self.self_k[layer][:, :, self.length:end] = k
        self.self_v[layer][:, :, self.length:end] = v
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep rows `index` (beam search). cross=False leaves the cross-attention state alone, which is right
        when every row is replaced by a row of the same input (beams of one batch item share the encoder output)."""
        self.self_k = [t.index_select(0, index) for t in self.self_k]
        self.self_v = [t.index_select(0, index) for t in self.self_v]
        if cross:
            self.cross_k = [t.index_select(0, index) for t in self.cross_k]
            self.cross_v = [t.index_select(0, index) for t in self.cross_v]
            if self.cross_bias is not None:
                self.cross_bias = self.cross_bias.index_select(0, index)


class T5Stack(nn.Module):
    """Encoder or decoder: blocks sharing one relative position bias table, then a final norm."""

    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        # HF keeps this table in block 0's attention; every block of the stack uses it.
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def position_bias(self, q_len: int, k_len: int, offset: int, device: torch.device) -> torch.Tensor:
        """(1, H, q_len, k_len) bias for queries at positions offset..offset+q_len-1 and keys 0..k_len-1."""
        query = torch.arange(q_len, dtype=torch.long, device=device)[:, None] + offset
        key = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(key - query, bidirectional=not self.is_decoder,
                                           num_buckets=self.config.relative_attention_num_buckets,
                                           max_distance=self.config.relative_attention_max_distance)  # (q, k)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, q, k)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, encoder_hidden: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None, cache: T5DecodeCache | None = None) -> torch.Tensor:
        x = self.dropout(x)
        for blk in self.block:
            x = blk(x, bias, encoder_hidden, cross_bias, cache)
        return self.dropout(self.final_layer_norm(x))


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each relative distance (key - query), as Mesh TensorFlow and transformers: half the buckets are exact
    small distances, the rest grow logarithmically up to max_distance; bidirectional splits them by sign, otherwise
    keys after the query (never attended by a causal decoder) share bucket 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


class T5Block(nn.Module):
    """Pre-norm residual sublayers: self-attention, (decoder) cross-attention, feed-forward."""

    def __init__(self, config: T5Config, is_decoder: bool, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5Attention(config)
        self.cross_attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon) if is_decoder else None
        self.cross_attn = T5Attention(config) if is_decoder else None
        self.ff_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, bias, encoder_hidden, cross_bias, cache):
        h = self.attn_norm(x)
        kv = None
        if cache is not None:
            kv = cache.write(self.index, *self.attn.project_kv(h))
        x = x + self.dropout(self.attn(h, bias, kv=kv))
        if self.cross_attn is not None:
            h = self.cross_attn_norm(x)
            if cache is not None:
                kv = (cache.cross_k[self.index], cache.cross_v[self.index])
            else:
                kv = self.cross_attn.project_kv(encoder_hidden)
            x = x + self.dropout(self.cross_attn(h, cross_bias, kv=kv))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class T5Attention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_head, self.d_kv = config.num_heads, config.d_kv
        self.dropout = config.dropout_rate
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S, C) -> keys, values (B, H, S, d_kv)."""
        B, S, _ = source.shape
        k = self.k(source).view(B, S, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, S, d_kv)
        v = self.v(source).view(B, S, self.n_head, self.d_kv).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) queries; kv: keys/values (B, H, S, d_kv) (default: projected from x, i.e. self-attention);
        bias: additive float mask broadcastable to (B, H, T, S) (position bias and padding)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, T, d_kv)
        k, v = self.project_kv(x) if kv is None else kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0)  # (B, H, T, d_kv); T5 does not scale scores
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_kv))


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # activated branch
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # linear branch
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        h = self.dropout(h)
        w = getattr(self.wo, "weight", None)
        if w is not None and w.is_floating_point() and h.dtype != w.dtype:
            h = h.to(w.dtype)  # transformers keeps `wo` in fp32 for half-precision flan-t5; follow its dtype
        return self.wo(h)


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm, no mean subtraction and no bias; the variance in fp32 (transformers' T5LayerNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x
