"""The one decoder model. Every supported family is this class plus a `Config`.

Module names follow one scheme (`transformer.h.N.attn.qkv`, `mlp.fc_1`, ...) so PEFT methods swap layers by
position in the tree, and `leantune.checkpoint.hf` maps HF key layouts onto it. The model imports nothing
else from leantune except the config, its fused ops and runtime's CPU check: PEFT methods plug in by replacing modules
or setting `attn.adapter`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.models import ops
from leantune.models.decoder.config import Config

# Under torch.compile, end the graph after the qkv projection: a LoRA qkv adds its updates to output slices in
# place, and inductor fusing those slice writes with RoPE's rotate-half concat gave one slow, mask-heavy loop nest.
# Split there, each side compiles to plain loops (see leantune/decode/compile.py). Only for training: a compiled decode step
# (no autograd) stays one graph.
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
        # Virtual tokens, set by a PEFT method (prompt tuning, P-tuning, prefix tuning): `n_virtual` positions that
        # precede every sequence. A module with `injects == "embeddings"` gives input embeddings (P, C) run through
        # the model like tokens (`embeddings()`); one with `injects == "kv"` gives each layer's keys and values
        # directly (`layer_kv()` -> (n_layer, 2, n_query_groups, P, head_size)). Callers keep numbering real tokens
        # from 0; the model shifts them by P, and the KV cache holds the virtual positions after the first call.
        self.virtual: nn.Module | None = None

    @property
    def n_virtual(self) -> int:
        return 0 if self.virtual is None else self.virtual.n_virtual

    @property
    def max_tokens(self) -> int:
        """Real tokens one sequence may hold: the block size less the virtual positions."""
        return self.config.block_size - self.n_virtual

    # ---- RoPE -----------------------------------------------------------------------------------------
    def rope_cache(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (block_size, rope_n_elem) in fp32, built lazily so meta-device models stay cheap."""
        if self._rope is None or self._rope[0].device != device:
            self._rope = build_rope_cache(self.config, device)
        return self._rope

    # ---- KV cache -------------------------------------------------------------------------------------
    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None,
                     static: bool = False) -> None:
        """Preallocate every layer's keys/values. static=True: attention always reads the whole buffer under a mask
        (shapes never change from step to step, so a compiled decode step is one graph; see leantune/decode/compile.py)."""
        max_seq_length = min((max_seq_length or self.config.block_size) + self.n_virtual, self.config.block_size)
        device = device or self.lm_head.weight.device
        dtype = dtype or self.transformer.wte.weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_seq_length,
                                          self.config.head_size, device, dtype, static)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Training and evaluation over whole sequences (no KV cache): idx (B, T) token ids -> logits
        (B, T, padded_vocab) or, with return_hidden, final hidden (B, T, C).

        position_ids (B, T): per-row positions (packing resets them per sample; left padding shifts them).
        segment_ids (B, T): packed sample index per token; attention never crosses samples.
        attention_mask (B, T): 1 for real tokens, 0 for padding.
        """
        return self._run(idx, None, position_ids, segment_ids, attention_mask, return_hidden)

    def decode(self, idx: torch.Tensor, input_pos: torch.Tensor, *, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """KV-cache decoding (`set_kv_cache` first): the prompt as one prefill call, then one call per new token.

        input_pos (T,): absolute cache positions of idx's tokens.
        position_ids (B, T): per-row positions when rows are left padded (default: input_pos).
        attention_mask (B, S): 1 for real tokens, 0 for padding, over all S keys of the cache.
        """
        return self._run(idx, input_pos, position_ids, None, attention_mask, return_hidden)

    def score(self, idx: torch.Tensor, *, context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              keep: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              return_hidden: bool = False) -> torch.Tensor:
        """Scoring rows with plain causal attention (right padding is never attended to), for loglikelihoods.

        context_kv: per layer (k, v), each (1, ng, P, hs), keys already rotated: a context of P tokens at positions
            0..P-1 that every row of idx continues (a prompt prefix shared by a batch, run once at batch size 1).
            idx holds only what follows it, numbered from P unless position_ids says otherwise; each token sees the
            whole context and its own row causally. Attention runs as two parts merged exactly
            (`attention_with_context`), so the rows keep SDPA's causal kernel, which does half the work of a masked
            one.
        keep (B, m): the positions of each row whose outputs are wanted (scoring reads one or a few per row); the
            result is (B, m, C|vocab) at those. The last block computes its attention output and MLP only there
            (its keys and values still cover every position), which saves most of that block.
        A model with virtual tokens (prompt/prefix/p-tuning) or a sliding window scores through `forward`.
        """
        if context_kv is None and keep is None:
            return self.forward(idx, position_ids=position_ids, return_hidden=return_hidden)
        if self.virtual is not None:
            raise ValueError("score(context_kv=, keep=) runs without virtual tokens; score through forward")
        P = 0 if context_kv is None else context_kv[0][0].shape[2]
        if self.config.sliding_window is not None and P + idx.shape[1] > self.config.sliding_window:
            raise ValueError("score(context_kv=, keep=) does not apply a sliding window; score through forward")
        T = idx.shape[1]
        if context_kv is not None:
            if len(context_kv) != self.config.n_layer:
                raise ValueError(f"context_kv has {len(context_kv)} layers, the model {self.config.n_layer}")
            if position_ids is None:
                position_ids = torch.arange(P, P + T, device=idx.device)[None]
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device)[None]
        x = self.transformer.wte(idx)  # (B, T, C)
        x, cos, sin = self._positions(x, position_ids)
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, None, None, context_kv=None if context_kv is None else context_kv[i],
                      keep=keep if i == last else None)
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    def _positions(self, x: torch.Tensor, position_ids: torch.Tensor):
        """x with learned position embeddings added, or the RoPE (cos, sin) of position_ids: (x, cos, sin)."""
        if self.config.learned_pos_emb:
            return x + self.transformer.wpe(position_ids), None, None
        cos_full, sin_full = self.rope_cache(x.device)
        cos = cos_full[position_ids].unsqueeze(1).to(x.dtype)  # (B|1, 1, T, rope_n_elem)
        sin = sin_full[position_ids].unsqueeze(1).to(x.dtype)
        return x, cos, sin

    def _run(self, idx, input_pos, position_ids, segment_ids, attention_mask, return_hidden) -> torch.Tensor:
        """The shared body of `forward` (input_pos None) and `decode`."""
        T = idx.shape[1]
        if position_ids is None:
            position_ids = input_pos.unsqueeze(0) if input_pos is not None else torch.arange(T, device=idx.device)[None]
        x = self.transformer.wte(idx)  # (B, T, C)
        prepended, layer_kv = 0, None
        if self.virtual is not None:
            x, position_ids, input_pos, attention_mask, prepended, layer_kv = self._enter_virtual(
                x, position_ids, input_pos, attention_mask)
        if input_pos is not None:
            mask = self._mask(x.shape[1], input_pos, None, attention_mask, idx.device)
        else:
            mask = self._mask(T, None, segment_ids, attention_mask, idx.device)
            if self.virtual is not None:
                mask = _mask_with_virtual(mask, T, self.n_virtual, prepended > 0, idx.device)
        x, cos, sin = self._positions(x, position_ids)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, mask, input_pos, None if layer_kv is None else layer_kv[i])
        if prepended:
            x = x[:, prepended:]  # (B, T, C): the virtual positions produce no outputs
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    def _enter_virtual(self, x, position_ids, input_pos, attention_mask):
        """Make room for the P virtual positions before the real tokens: shift positions by P, and when this call
        starts a sequence, prepend the virtual embeddings or (with the KV cache) write the prefix keys/values into
        the cache once. Returns x, position_ids, input_pos, attention_mask, the number of prepended positions and
        per-layer prefix keys/values (no-cache prefix tuning only)."""
        virtual, P = self.virtual, self.virtual.n_virtual
        B, device = x.shape[0], x.device
        starts = input_pos is None or int(input_pos[0]) == 0
        position_ids = position_ids + P
        if input_pos is not None:
            input_pos = input_pos + P
            if attention_mask is not None:  # (B, S) -> (B, P + S): virtual positions are always attended to
                attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if not starts:
            return x, position_ids, input_pos, attention_mask, 0, None
        virtual_pos = torch.arange(P, device=device)
        if virtual.injects == "embeddings":
            prompt = virtual.embeddings().to(x.dtype)  # (P, C)
            x = torch.cat([prompt.expand(B, -1, -1), x], dim=1)  # (B, P + T, C)
            position_ids = torch.cat([virtual_pos.expand(position_ids.shape[0], -1), position_ids], dim=1)
            if input_pos is not None:
                input_pos = torch.cat([virtual_pos, input_pos])
            return x, position_ids, input_pos, attention_mask, P, None
        layer_kv = virtual.layer_kv()  # (n_layer, 2, ng, P, hs)
        if input_pos is None:
            return x, position_ids, input_pos, attention_mask, 0, layer_kv
        for block, (k, v) in zip(self.transformer.h, layer_kv):
            if block.attn.kv_cache is None:
                raise RuntimeError("decoding with input_pos needs set_kv_cache() first")
            block.attn.kv_cache.update(virtual_pos, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
        return x, position_ids, input_pos, attention_mask, 0, None

    def _mask(self, T, input_pos, segment_ids, attention_mask, device) -> torch.Tensor | None:
        """A boolean (B|1, 1, T, S) mask where True means "may attend", or None for the plain causal case."""
        window = self.config.sliding_window
        if input_pos is not None:  # KV-cache decoding: keys are positions 0..S-1 of the cache
            cache = self.transformer.h[0].attn.kv_cache
            if cache is not None and cache.static:
                S = cache.k.shape[2]  # the whole buffer; the mask hides the positions not written yet
            else:
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


def _mask_with_virtual(mask, T: int, P: int, prepended: bool, device) -> torch.Tensor:
    """Extend the real tokens' mask (B|1, 1, T, T), or None for plain causal, over P virtual positions that every
    token may see: to (B|1, 1, T, P + T) for prefix keys, or (B|1, 1, P + T, P + T) when the virtual tokens run
    through the model too (they see only each other, causally)."""
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    b = mask.shape[0]
    mask = torch.cat([torch.ones(b, 1, T, P, dtype=torch.bool, device=device), mask], dim=-1)  # (b, 1, T, P + T)
    if not prepended:
        return mask
    top = torch.ones(P, P + T, dtype=torch.bool, device=device).tril()  # virtual rows: causal, never the real tokens
    return torch.cat([top.expand(b, 1, P, P + T), mask], dim=-2)  # (b, 1, P + T, P + T)


class Block(nn.Module):
    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        self.config = config
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, index)
        self.norm_2 = None if config.shared_attention_norm else make_norm(config)
        self.mlp = SwiGLUMLP(config) if config.mlp_class == "swiglu" else GeluMLP(config)
        for norm in (self.norm_1, self.norm_2):
            if isinstance(norm, RMSNorm):
                norm.feeds_linears = True  # into qkv (attention) and the MLP's first linears alone

    def forward(self, x, cos, sin, mask, input_pos, prefix_kv=None, context_kv=None, keep=None):
        """keep (B, m): only these positions go on past the attention, whose keys/values still read all of x."""
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, cos, sin, mask, input_pos, prefix_kv, context_kv, keep)
        if keep is not None:  # (B, T, C) -> (B, m, C)
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            x_normed = x_normed.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
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

    def forward(self, x, cos, sin, mask, input_pos, prefix_kv=None, context_kv=None, keep=None):
        """prefix_kv: this layer's prefix-tuning keys and values (2, ng, P, hs), attended to before the sequence
        (no RoPE: they have no position) when decoding without the KV cache.
        context_kv: this layer's (k, v) of a shared context every row continues, (1, ng, P, hs) each, rotated at
        positions 0..P-1 (see GPT.forward); the rows attend to it and to themselves causally, with no mask.
        keep (B, m): queries only at these positions (plain causal attention; see GPT.forward) -> (B, m, C)."""
        cfg = self.config
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (nh + 2 * ng) * hs)
        if torch.compiler.is_compiling() and _COMPILE_SPLIT_QKV and torch.is_grad_enabled():
            torch._dynamo.graph_break()
        fp32_attention = _attend_in_fp32(qkv)
        if fp32_attention:
            qkv = qkv.float()
        nq, nk, nv = cfg.qkv_sizes
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # eager training: split's backward concatenates the three gradients in one pass; three slices would each
            # zero-fill a (B, T, qkv) gradient, copy into it and add the three (~8 passes, ~3% of a CPU LoRA step)
            q, k, v = qkv.split((nq, nk, nv), dim=-1)
        else:  # slices, not Tensor.split: under a compiled decode step's gemv.ReductionLinears dynamo records that
            # Python-level method as a call AOT autograd's cache refuses (a new process would trace the step again)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        q = q.view(B, T, cfg.n_head, cfg.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, cfg.n_query_groups, cfg.head_size).transpose(1, 2)  # (B, ng, T, hs)
        if cos is not None:
            rope = ops.rope if _use_fused(q) else apply_rope
            q = rope(q, cos, sin)
            k = rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, ng, S, hs)
        if prefix_kv is not None:
            pk, pv = prefix_kv.to(k.dtype)  # (ng, P, hs) each
            k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)  # (B, ng, P + T, hs)
            v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        if keep is not None:  # a few queries per row: a small (B, 1, m, S) mask costs nothing here
            q = q.gather(2, keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))  # (B, nh, m, hs)
            visible = torch.arange(T, device=x.device) <= keep[:, :, None]  # (B, m, T)
            if context_kv is not None:
                ck, cv = context_kv
                k = torch.cat([ck.expand(B, -1, -1, -1), k], dim=2)  # (B, ng, P + T, hs)
                v = torch.cat([cv.expand(B, -1, -1, -1), v], dim=2)
                visible = torch.cat([visible.new_ones(*visible.shape[:2], ck.shape[2]), visible], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=1.0 / math.sqrt(cfg.head_size),
                                               enable_gqa=cfg.n_query_groups != cfg.n_head)  # (B, nh, m, hs)
        elif context_kv is not None:
            y = attention_with_context(q, k, v, *context_kv, scale=1.0 / math.sqrt(cfg.head_size))
        elif T == 1 and mask is not None and self.kv_cache is not None and self.kv_cache.static and prefix_kv is None \
                and torch.compiler.is_compiling():
            y = one_query_attention(q, k, v, mask, scale=1.0 / math.sqrt(cfg.head_size))
        else:
            is_causal = mask is None and input_pos is None and T > 1
            # fp32 attention: under bf16-mixed training (q is fp32 already; a KV cache kept in bf16 joins it), or
            # serve's bf16 decode steps (SlotKVCache.attend_fp32, the only cache with it), whose output goes back
            upcast = input_pos is not None and getattr(self.kv_cache, "attend_fp32", False)
            qa, ka, va = (q.float(), k.float(), v.float()) if fp32_attention or upcast else (q, k, v)
            with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    qa, ka, va, attn_mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(cfg.head_size),
                    enable_gqa=cfg.n_query_groups != cfg.n_head,
                )  # (B, nh, T, hs)
            if upcast:
                y = y.to(q.dtype)
        if self.adapter is not None:
            y = y + self.adapter(self, q)
        y = y.transpose(1, 2).reshape(B, y.shape[2], cfg.n_head * cfg.head_size)  # (B, T|m, nh*hs)
        return self.proj(y)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Attention of one new token per row over a whole static KV cache, as products and sums that inductor fuses into
    the compiled decode step's loops. There SDPA is an opaque call with a fixed cost of ~30 us per layer, ~1 ms of a
    ~12 ms int4 token on the default model. Eager decoding keeps SDPA: this form would materialize every product.

    q (B, nh, 1, hs); k, v (B, ng, S, hs); mask (B|1, 1, 1, S) bool, True where a key is visible -> (B, nh, 1, hs).
    """
    B, nh, _, hs = q.shape
    ng = k.shape[1]
    q = q.reshape(B, ng, nh // ng, 1, hs)  # query head i uses KV head i // (nh // ng)
    scores = (q * k[:, :, None]).sum(-1) * scale  # (B, ng, rep, S)
    scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    out = (scores.softmax(-1)[..., None] * v[:, :, None]).sum(-2)  # (B, ng, rep, hs)
    return out.reshape(B, nh, 1, hs)


def attention_with_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_k: torch.Tensor,
                           context_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of q over a shared context (every key visible) followed by the rows' own keys (causal): equal to
    SDPA over the concatenated keys with the matching mask, without the mask.

    q (B, nh, T, hs); k, v (B, ng, T, hs); context_k, context_v (1|B, ng, P, hs) -> (B, nh, T, hs). The two parts
    are softmaxes over disjoint key sets, merged exactly by their log-sum-exps: the causal part is SDPA's flash
    kernel (CPU's returns its logsumexp), the context part (P is small) plain matmuls with the query heads of one
    KV group folded together, as head i uses KV head i // (nh // ng). Both parts work in q's contiguous layout, so
    the merge is one same-layout pass (mixing layouts made it the costliest step).
    """
    B, nh, T, hs = q.shape
    ng = context_k.shape[1]
    q = q.contiguous()
    own, own_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=0.0, is_causal=True, scale=scale)  # (B, nh, T, hs) as q, (B, nh, T) fp32
    scores = torch.matmul(q.view(B, ng, nh // ng * T, hs), context_k.transpose(-1, -2)).float().mul_(scale)
    own_lse = own_lse.reshape(B, ng, nh // ng * T)  # (B, ng, rep*T), as scores (B, ng, rep*T, P)
    lse = torch.logaddexp(own_lse, scores.logsumexp(-1))
    out = torch.matmul(scores.sub_(lse[..., None]).exp_().to(q.dtype), context_v)  # the context part, weighted
    own = own.reshape(B, ng, nh // ng * T, hs)
    return out.addcmul_(own, (own_lse - lse).exp_().to(own.dtype)[..., None]).view(B, nh, T, hs)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_query_groups, max_seq, head_size); decoding writes at input_pos.

    update() returns the filled prefix (B, ng, S, hs), or with static=True the whole buffer (B, ng, max_seq, hs),
    which GPT._mask then masks: no shape depends on the position, and no tensor value is read on the host."""

    def __init__(self, batch_size, n_groups, max_seq_length, head_size, device, dtype, static: bool = False) -> None:
        super().__init__()
        self.static = static
        shape = (batch_size, n_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        if self.static:
            return self.k[:B], self.v[:B]
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
        self.feeds_linears = False
        """Set by a Block whose norm output goes only into linear layers, which autocast casts to its dtype: under
        autocast the fused path then writes that dtype directly (the same values) instead of fp32 that every
        consumer casts again, forward and backward (4 casts a layer with LoRA on q/v: ~3% of a CPU bf16-mixed step)."""

    def forward(self, x):
        if _use_fused(x) and self.weight.dtype == torch.float32:
            out_dtype = None
            if self.feeds_linears and torch.is_autocast_enabled(x.device.type):
                out_dtype = torch.get_autocast_dtype(x.device.type)
            return ops.rms_norm(x, self.weight, self.eps, out_dtype)  # same math, fewer passes and saved tensors
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


def _attend_in_fp32(qkv: torch.Tensor) -> bool:
    """Under CPU bf16 autocast (bf16-mixed training), RoPE and attention run on fp32 q, k, v (autocast is paused for
    SDPA, which it would cast back to bf16): one cast of the qkv projection instead of RoPE's casts per op, and CPU
    flash attention's bf16 backward is slower than its fp32 one with or without AMX (4 rows x 9 heads, 2 threads:
    2.4x without AMX at 64 positions; with AMX 4.5x at 56, 2.5x at 128, 1.2x at 256)."""
    return (qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _use_fused(x: torch.Tensor) -> bool:
    """Hand-fused ops (leantune.models.ops) serve eager fp32, with autograd or without (the same bits either way, so a no-grad
    pass equals the training forward); under torch.compile the plain expressions fuse better, and other dtypes keep
    the reference rounding of transformers."""
    return x.dtype == torch.float32 and not torch.compiler.is_compiling()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_n_elem dims of each head (rotate-half layout, as HF); the rest pass through."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
