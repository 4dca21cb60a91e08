"""Evaluation: batched greedy completion (left padding + KV cache), exact-match accuracy, validation loss, and the
`leantune evaluate` command that runs them on a base model, an adapter, or a quantized base."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from leantune.data import DataModule
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


@torch.no_grad()
def validation_loss(model: GPT, loader, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the supervised tokens of `loader`, and its perplexity."""
    from leantune.train.loss import supervised_ce_sum

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        kwargs = {k: batch[k].to(device) for k in ("position_ids", "segment_ids") if k in batch}
        hidden = model(batch["input_ids"].to(device), return_hidden=True, **kwargs)
        labels = batch["labels"].to(device)
        total += float(supervised_ce_sum(hidden, model.lm_head, labels))
        n += int((labels != -100).sum())
    model.train(was_training)
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def task_eval(data, tokenizer, style, max_new_tokens: int = 32):
    """Exact match on the data module's held-out test set, when it has one (the demo tasks do); else None."""
    if not hasattr(data, "test_set"):
        return None
    records = data.test_set()
    prompts = [style.render_prompt(r) for r in records]
    answers = [r["output"] for r in records]

    def run(model: GPT) -> tuple[float, list[str]]:
        return exact_match(model, tokenizer, prompts, answers, data.score, max_new_tokens=max_new_tokens)

    return run


def evaluate_command(
    checkpoint_dir: Path | None = None,
    adapter: Path | None = None,
    data: DataModule | None = None,
    quantize: str | None = None,
    precision: str | None = None,
    prompt_style: str | None = None,
    max_seq_length: int = 1024,
    batch_size: int = 8,
    max_batches: int | None = None,
    max_new_tokens: int = 32,
    exact_match: bool = True,
    out_file: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Evaluate a model, with an adapter or a quantized base: validation loss, perplexity, and exact match.

    Validation loss and perplexity come from the data module's validation split; exact match from its held-out
    test set when it has one (the demo tasks do).

    Args:
        checkpoint_dir: Base model folder (default: the bundled default model).
        adapter: A leantune adapter folder (e.g. out/finetune/lora/final) or a PEFT LoRA folder, applied unmerged.
        data: Data module (default Demo), e.g. --data JSON --data.json_path file.jsonl --data.val_split_fraction 0.1.
        quantize: Load the base's block linears in 4/8 bits: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8.
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        prompt_style: Prompt style (default: the adapter's, else the checkpoint's chat template or config).
        max_seq_length: Longest validation sample in tokens (longer ones are truncated as in training).
        batch_size: Validation batch size.
        max_batches: Evaluate on at most this many validation batches (default: all).
        max_new_tokens: Generation budget per exact-match prompt.
        exact_match: Run the held-out exact-match evaluation when the data module has a test set.
        out_file: Also write the results as JSON here.
        threads: CPU threads for torch.
    """
    from leantune.data import Demo
    from leantune.finetune import DEFAULT_CHECKPOINT, _ensure_checkpoint
    from leantune.generate import load_for_inference

    if threads:
        torch.set_num_threads(threads)
    checkpoint_dir = _ensure_checkpoint(Path(checkpoint_dir or DEFAULT_CHECKPOINT))
    model, tokenizer, precision, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    if prompt_style is None and adapter is not None and (Path(adapter) / "leantune.json").is_file():
        prompt_style = json.loads((Path(adapter) / "leantune.json").read_text()).get("prompt_style")
    data = data if data is not None else Demo()
    data.connect(tokenizer, prompt_style=prompt_style, max_seq_length=max_seq_length, batch_size=batch_size)
    data.setup()
    result: dict = {"checkpoint": str(checkpoint_dir), "adapter": str(adapter) if adapter else None,
                    "quantize": quantize, "precision": precision, "data": type(data).__name__}
    if data.val_dataset is not None and len(data.val_dataset):
        result.update(validation_loss(model, data.val_dataloader(), device, max_batches))
        print(f"validation loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f})")
    task = task_eval(data, tokenizer, data.prompt_style, max_new_tokens) if exact_match else None
    if task is not None:
        acc, _ = task(model)
        result["exact_match"] = acc
        print(f"held-out exact match: {acc:.1%} ({len(data.test_set())} prompts)")
    if out_file is not None:
        from leantune.checkpoint.io import write_json

        write_json(Path(out_file), result)
    return result
