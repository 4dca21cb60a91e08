"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning install as `GPT.virtual`.

The model runs `PromptEmbeddings` (prompt tuning, P-tuning) like P extra input tokens before every sequence, and
feeds `PrefixKV` (prefix tuning) to each layer's attention as P extra keys/values; either way the real tokens are
shifted by P positions and, when decoding, the virtual positions are computed once per sequence and then live in the
KV cache. Submodule names follow PEFT's prompt encoders (`embedding`, `mlp_head`, `lstm_head`, `transform`) so one
optimizer step or one state dict means the same thing in both.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leantune.models.decoder.model import GPT
from leantune.models.kinds import is_seq2seq, kind_of
from leantune.models.quantize import compute_dtype_of


class PromptEmbeddings(nn.Module):
    """P learned input embeddings (P, n_embd), optionally produced by a prompt encoder (P-tuning's MLP or LSTM)."""

    injects = "embeddings"

    def __init__(self, n_virtual: int, dim: int, encoder: str = "none", hidden_size: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.n_virtual, self.encoder = n_virtual, encoder
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(n_virtual, dim, **kw)
        h = hidden_size or dim
        if encoder == "mlp":  # PEFT's PromptEncoder MLP: two hidden ReLU layers
            self.mlp_head = nn.Sequential(nn.Linear(dim, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, dim, **kw))
        elif encoder == "lstm":  # bidirectional LSTM, then a two-layer MLP back to the embedding width
            self.lstm_head = nn.LSTM(dim, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, dim, **kw))
        elif encoder != "none":
            raise ValueError(f"prompt encoder must be none, mlp or lstm, got {encoder!r}")

    def embeddings(self) -> torch.Tensor:
        """(P, n_embd) embeddings of the virtual tokens."""
        x = self.embedding.weight
        if self.encoder == "lstm":
            x = self.lstm_head(x[None])[0][0]  # (1, P, 2h) -> (P, 2h)
        if self.encoder != "none":
            x = self.mlp_head(x)
        return x

    def extra_repr(self) -> str:
        return f"n_virtual={self.n_virtual}, encoder={self.encoder}"


class PrefixKV(nn.Module):
    """Prefix tuning's per-layer keys and values, optionally reparameterised through an MLP (Li & Liang 2021).

    The flat vector of one virtual position is laid out as PEFT's: (n_layer * 2 [key, value], n_query_groups,
    head_size), so PEFT folders map tensor for tensor.
    """

    injects = "kv"

    def __init__(self, n_virtual: int, n_layer: int, n_groups: int, head_size: int, projection: bool = False,
                 hidden_size: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.n_virtual, self.n_layer, self.n_groups, self.head_size = n_virtual, n_layer, n_groups, head_size
        self.projection = projection
        kw = dict(device=device, dtype=dtype)
        token_dim = n_groups * head_size
        out = n_layer * 2 * token_dim
        if projection:
            h = hidden_size or token_dim
            self.embedding = nn.Embedding(n_virtual, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, h, **kw), nn.Tanh(), nn.Linear(h, out, **kw))
        else:
            self.embedding = nn.Embedding(n_virtual, out, **kw)

    def flat(self) -> torch.Tensor:
        """(P, n_layer * 2 * n_groups * head_size): the prefix as PEFT stores it once the MLP is dropped."""
        x = self.embedding.weight
        return self.transform(x) if self.projection else x

    def layer_kv(self) -> torch.Tensor:
        """(n_layer, 2, n_groups, P, head_size): each layer's prefix keys ([:, 0]) and values ([:, 1])."""
        P, L, g, hs = self.n_virtual, self.n_layer, self.n_groups, self.head_size
        x = self.flat().view(P, L * 2, g, hs).permute(1, 2, 0, 3)  # (2L, g, P, hs)
        return x.reshape(L, 2, g, P, hs)

    def extra_repr(self) -> str:
        return f"n_virtual={self.n_virtual}, n_layer={self.n_layer}, projection={self.projection}"


def install(model: GPT, virtual: nn.Module) -> list[nn.Parameter]:
    """Set `model.virtual`; returns its parameters (what the method trains)."""
    if model.virtual is not None:
        raise ValueError("the model already has virtual tokens (one prompt/prefix method at a time)")
    if virtual.n_virtual < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {virtual.n_virtual}")
    if not is_seq2seq(model) and virtual.n_virtual >= model.config.block_size:  # T5: relative positions, no limit
        raise ValueError(f"num_virtual_tokens {virtual.n_virtual} leaves no room in the model's "
                         f"{model.config.block_size}-token context")
    model.virtual = virtual
    return list(virtual.parameters())


def placement(model: GPT) -> dict:
    """Device and dtype for new virtual-token tensors: the embedding's (the compute dtype for a quantized base)."""
    w = input_embedding(model).weight
    return dict(device=w.device, dtype=compute_dtype_of(w))


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding virtual tokens live beside (the model kind's: GPT's wte, T5's shared)."""
    return kind_of(model).embedding(model)


def virtual_params(model: nn.Module) -> list[nn.Parameter]:
    """The virtual tokens' tensors (embedding and, while training, the encoder or projection)."""
    virtual = getattr(model, "virtual", None)
    return [] if virtual is None else list(virtual.parameters())


@torch.no_grad()
def init_from_tokens(prompt: PromptEmbeddings, model: GPT, token_ids: list[int]) -> None:
    """Start the virtual embeddings at these tokens' embeddings, cycled or cut to P (PEFT's TEXT init)."""
    if not token_ids:
        raise ValueError("the init text encodes to no tokens")
    P = prompt.n_virtual
    ids = (token_ids * (P // len(token_ids) + 1))[:P]
    w = input_embedding(model).weight
    if w.is_meta or prompt.embedding.weight.is_meta:
        return
    prompt.embedding.weight.copy_(w[torch.tensor(ids, device=w.device)].to(prompt.embedding.weight.dtype))


def sample_vocab_ids(model: GPT, n: int) -> list[int]:
    """n random token ids of the real vocabulary (PEFT's SAMPLE_VOCAB init), from torch's global RNG."""
    return torch.randint(0, model.config.vocab_size, (n,), device="cpu").tolist()
