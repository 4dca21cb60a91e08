"""Task evaluation: batched greedy completion (left padding + KV cache) and exact-match accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from leantune.model import GPT


@torch.inference_mode()
def greedy_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of several prompts at once; each stops at its first stop id (not included)."""
    device = model.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    max_len = min(L + max_new_tokens, model.config.block_size)
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros(B, max_len, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
        idx[i, L - len(p):] = torch.tensor(p, device=device)
        attn[i, L - len(p):L] = 1
    pos = (attn[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L) per-row positions
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    model.set_kv_cache(B, max_len, device=device)
    try:
        input_pos = torch.arange(L, device=device)
        x = idx
        for t in range(max_len - L):
            hidden = model(x, input_pos=input_pos, position_ids=pos, attention_mask=attn, return_hidden=True)
            nxt = model.lm_head(hidden[:, -1]).argmax(-1)  # (B,)
            done |= torch.isin(nxt, stop)
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            attn[:, L + t] = 1
            x = nxt[:, None]  # (B, 1)
            pos = pos[:, -1:] + 1
            input_pos = input_pos[-1:] + 1
    finally:
        model.clear_kv_cache()
    return out


def exact_match(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    score: Callable[[str, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> tuple[float, list[str]]:
    """Accuracy of greedy completions of rendered prompts against reference answers; also returns predictions."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(p, bos=None) for p in prompts]
    preds: list[str] = []
    for s in range(0, len(encoded), batch_size):
        chunk = encoded[s:s + batch_size]
        outs = greedy_batch(model, chunk, max_new_tokens, tokenizer.eos_ids,
                            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        preds.extend(tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs)
    model.train(was_training)
    correct = sum(bool(score(p, a)) for p, a in zip(preds, answers))
    return correct / max(len(answers), 1), preds
