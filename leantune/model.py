"""The one decoder model. Every supported family is this class plus a `Config`.

Module names follow one scheme (`transformer.h.N.attn.qkv`, `mlp.fc_1`, ...) so PEFT methods swap layers by
position in the tree, and `leantune.checkpoint.hf` maps HF key layouts onto it. The model imports nothing
else from leantune except the config: PEFT methods plug in by replacing modules or setting `attn.adapter`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune import ops
from leantune.config import Config

# Under torch.compile, end the graph after the qkv projection: a LoRA qkv adds its updates to output slices in
# place, and inductor fusing those slice writes with RoPE's rotate-half concat gave one slow, mask-heavy loop nest.
# Split there, each side compiles to plain loops (see leantune/compile.py).
_COMPILE_SPLIT_QKV = True


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        if config.learned_pos_emb:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- RoPE -----------------------------------------------------------------------------------------
    def rope_cache(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (block_size, rope_n_elem) in fp32, built lazily so meta-device models stay cheap."""
        if self._rope is None or self._rope[0].device != device:
            self._rope = build_rope_cache(self.config, device)
        return self._rope

    # ---- KV cache -------------------------------------------------------------------------------------
    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> None:
        max_seq_length = max_seq_length or self.config.block_size
        device = device or self.lm_head.weight.device
        dtype = dtype or self.transformer.wte.weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_seq_length,
                                          self.config.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- forward --------------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, padded_vocab) or, with return_hidden, final hidden (B, T, C).

        input_pos (T,): absolute positions of idx when decoding with the KV cache.
        position_ids (B, T): per-row positions (packing resets them per sample; left padding shifts them).
        segment_ids (B, T): packed sample index per token; attention never crosses samples.
        attention_mask (B, S): 1 for real tokens, 0 for padding, over all S keys (cache included).
        """
        B, T = idx.shape
        if position_ids is None:
            position_ids = input_pos.unsqueeze(0) if input_pos is not None else torch.arange(T, device=idx.device)[None]
        mask = self._mask(T, input_pos, segment_ids, attention_mask, idx.device)

        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.learned_pos_emb:
            x = x + self.transformer.wpe(position_ids)
            cos = sin = None
        else:
            cos_full, sin_full = self.rope_cache(idx.device)
            cos = cos_full[position_ids].unsqueeze(1).to(x.dtype)  # (B|1, 1, T, rope_n_elem)
            sin = sin_full[position_ids].unsqueeze(1).to(x.dtype)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, input_pos)
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    def _mask(self, T, input_pos, segment_ids, attention_mask, device) -> torch.Tensor | None:
        """A boolean (B|1, 1, T, S) mask where True means "may attend", or None for the plain causal case."""
        window = self.config.sliding_window
        if input_pos is not None:  # KV-cache decoding: keys are positions 0..S-1 of the cache
            S = int(input_pos[-1]) + 1
            if T == 1 and attention_mask is None and (window is None or S <= window):
                return None  # a single new token attends to everything cached so far
            keys = torch.arange(S, device=device)[None]
            mask = input_pos[:, None] >= keys  # (T, S)
            if window is not None:
                mask = mask & (input_pos[:, None] - keys < window)
            mask = mask[None, None]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :S].bool()
            return mask
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if window is not None and T > window:  # Mistral-style sliding window: only the last `window` keys
            causal = causal & ~torch.ones(T, T, dtype=torch.bool, device=device).tril(-window)
            if segment_ids is None and attention_mask is None:
                return causal[None, None]
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            return (same & causal)[:, None]
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
            # keep the diagonal so rows of padding tokens never attend to nothing (NaN)
            return (causal & keys) | torch.eye(T, dtype=torch.bool, device=device)
        return None


class Block(nn.Module):
    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        self.config = config
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, index)
        self.norm_2 = None if config.shared_attention_norm else make_norm(config)
        self.mlp = SwiGLUMLP(config) if config.mlp_class == "swiglu" else GeluMLP(config)

    def forward(self, x, cos, sin, mask, input_pos):
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, cos, sin, mask, input_pos)
        if self.config.parallel_residual:
            mlp_in = x_normed if self.norm_2 is None else self.norm_2(x)
            return self.mlp(mlp_in) + h + x
        x = h + x
        return self.mlp(self.norm_2(x)) + x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        self.config = config
        self.index = index
        self.qkv = nn.Linear(config.n_embd, sum(config.qkv_sizes), bias=config.bias or config.attn_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.kv_cache: KVCache | None = None
        # Optional extra attention term (LLaMA-Adapter's gated prefix), set by a PEFT method:
        # called as adapter(attn, q) -> (B, n_head, T, head_size) and added to the attention output.
        self.adapter: nn.Module | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        cfg = self.config
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (nh + 2 * ng) * hs)
        if torch.compiler.is_compiling() and _COMPILE_SPLIT_QKV:
            torch._dynamo.graph_break()
        q, k, v = qkv.split(cfg.qkv_sizes, dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (B, ng, T, hs)
        if cos is not None:
            rope = ops.rope if _use_fused(q) else apply_rope
            q = rope(q, cos, sin)
            k = rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, ng, S, hs)
        is_causal = mask is None and input_pos is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(cfg.head_size),
            enable_gqa=cfg.n_query_groups != cfg.n_head,
        )  # (B, nh, T, hs)
        if self.adapter is not None:
            y = y + self.adapter(self, q)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_size)  # (B, T, nh*hs)
        return self.proj(y)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_query_groups, max_seq, head_size); decoding writes at input_pos."""

    def __init__(self, batch_size, n_groups, max_seq_length, head_size, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, n_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        S = int(input_pos[-1]) + 1  # attend only over the filled prefix, not the whole buffer
        return self.k[:B, :, :S], self.v[:B, :, :S]


class SwiGLUMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)  # gate
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)  # up
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)  # down

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class GeluMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.approximate = config.gelu_approximate
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, scale in the input dtype (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        if _use_fused(x) and self.weight.dtype == torch.float32:
            return ops.rms_norm(x, self.weight, self.eps)  # same math, fewer passes and saved tensors
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def build_rope_cache(config: Config, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = config.rope_n_elem
    if n == 0:
        return torch.empty(0, device=device), torch.empty(0, device=device)
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, device=device, dtype=torch.int64).float() / n))
    rs = config.rope_scaling
    positions = torch.arange(config.block_size, device=device, dtype=torch.float32)
    if rs and rs["type"] == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rs)
    elif rs and rs["type"] == "linear":
        positions = positions / rs["factor"]
    freqs = torch.outer(positions, inv_freq)  # (block_size, n/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, n)
    return emb.cos(), emb.sin()


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _use_fused(x: torch.Tensor) -> bool:
    """Hand-fused ops (leantune.ops) serve eager fp32; under torch.compile the plain expressions fuse better, and
    other dtypes keep the reference rounding of transformers."""
    return x.dtype == torch.float32 and not torch.compiler.is_compiling()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_n_elem dims of each head (rotate-half layout, as HF); the rest pass through."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
