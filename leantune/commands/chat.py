"""`leantune chat`: a multi-turn terminal chat that keeps the history in the model's chat template."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_seed
from leantune.download import DEFAULT_CHECKPOINT
from leantune.generate import Sampling, bos_for_rendered, stream_text
from leantune.inference import load_for_inference


def chat(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    adapter: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float = 0.9,
    precision: str | None = None,
    quantize: str | None = None,
    seed: int = 1234,
) -> None:
    """Chat with a model in the terminal. Type /reset to clear the history, /exit (or Ctrl-D) to quit.

    Args:
        checkpoint_dir: A Hugging Face model folder with a chat template.
        adapter: An adapter folder (any method) or a PEFT folder, applied unmerged on the base.
        system: Optional system message.
        max_new_tokens: Most tokens per answer.
        temperature: Sampling temperature; 0 means greedy.
        top_k: Sample among the k most likely tokens.
        top_p: Nucleus sampling mass in (0, 1].
        precision: 32-true, bf16-true, 16-true.
        quantize: int8 or int4: weight-only quantized linears and head for fast CPU decoding (torch's kernels, fp32
            accumulation); or bitsandbytes 4/8 bits as QLoRA trains: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8
            (use the mode a QLoRA adapter was trained with).
        seed: Random seed for sampling.
    """
    sampling = Sampling(temperature, top_k, top_p)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_seed(seed)
    check_model_flags(precision, quantize, inference=True)
    check_folder("adapter", adapter)
    model, tokenizer, _, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    if not tokenizer.chat_template:
        raise ValueError(f"{checkpoint_dir} has no chat template; use `leantune generate --raw true` instead")
    generator = torch.Generator(device=device).manual_seed(seed)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            user = input(">> ").strip()
        except EOFError:
            print()
            return
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            history = history[:1] if system else []
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        ids = torch.tensor(tokenizer.encode(text, bos=bos_for_rendered(tokenizer, text)), dtype=torch.long)
        budget = model.max_tokens - len(ids)
        if budget <= 0:
            print("[history is longer than the model's context; /reset to start over]", file=sys.stderr)
            history.pop()
            continue
        answer, _, _ = stream_text(model, tokenizer, ids, min(max_new_tokens, budget), sampling, None, generator)
        print()
        history.append({"role": "assistant", "content": answer})
