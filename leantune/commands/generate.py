"""`leantune generate`: one prompt, streamed to the terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_seed, check_threads
from leantune.cpu_threads import apply_threads
from leantune.decode.compile import wants_compile
from leantune.decode.generate import Sampling, encode_prompt, generate_tokens, stream_text
from leantune.download import DEFAULT_CHECKPOINT
from leantune.inference import load_for_inference, pack_for_eager_decoding, seq2seq_answer
from leantune.models.kinds import is_seq2seq


def generate(
    prompt: str = "What is the capital of France?",
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = 50,
    top_p: float = 0.9,
    stop: list[str] | None = None,
    raw: bool = False,
    system: str | None = None,
    precision: str | None = None,
    adapter: Path | None = None,
    quantize: str | None = None,
    seed: int = 1234,
    threads: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    compile: bool | None = None,
) -> str:
    """Generate text from a prompt with the KV cache, streaming tokens to the terminal.

    Args:
        prompt: The prompt. Instruct checkpoints get their chat template applied unless --raw.
        checkpoint_dir: A Hugging Face model folder (see `leantune download`; the default model is imported on
            first use).
        max_new_tokens: Most tokens to generate.
        temperature: Sampling temperature; 0 (the default, or anything below 1e-5) means greedy decoding, e.g. 0.7
            samples.
        top_k: When sampling, only among the k most likely tokens (None: all).
        top_p: When sampling, nucleus mass in (0, 1] (1.0: off).
        stop: Extra stop strings; generation also stops on the checkpoint's EOS ids.
        raw: Send the prompt as is, without the chat template.
        system: Optional system message for the chat template.
        precision: 32-true, bf16-true, 16-true (default: fastest safe one for the device).
        adapter: An adapter folder (e.g. out/finetune/lora/final, any method) or a PEFT folder, applied unmerged.
        quantize: int8 or int4: weight-only quantized linears and head for fast CPU decoding (torch's kernels, fp32
            accumulation); or bitsandbytes 4/8 bits as QLoRA trains: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8
            (use the mode a QLoRA adapter was trained with).
        seed: Random seed for sampling.
        threads: CPU threads for torch (default: one per usable CPU; when the machine is busy at start, OpenMP's
            threads sleep instead of spinning while they wait, so other work cannot stall every op; the choice
            is printed).
        num_beams: Beam search with this many beams (encoder-decoder models such as T5; 1: greedy or sampling).
        length_penalty: Beam search ranks finished outputs by log-probability / length ** length_penalty.
        compile: Compile the one-token decode step with torch.compile (inductor, needs a C++ compiler on CPU): one
            fused graph instead of ~20 small ops per layer, 1.1-2x faster decoding with --quantize int4/int8 on the
            default model. The first compile takes about a minute on 2 CPU cores, later ones 7-20 s from inductor's
            cache (kept in ~/.cache/leantune/inductor, or TORCHINDUCTOR_CACHE_DIR). Unset (the default): compile
            only when the token budget (--max_new_tokens, within the context) is at least 1024, where the compile
            time is won back; true always, false never. Compile time is reported apart from tokens/s. Tokens can
            differ from eager decoding in the last bits of the logits.
    """
    sampling = Sampling(temperature, top_k, top_p)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_seed(seed)
    check_threads(threads)
    check_model_flags(precision, quantize, inference=True)
    check_folder("adapter", adapter)
    if raw and not prompt:
        raise ValueError("--prompt is empty: give a prompt (with --raw true nothing would be sent to the model)")
    check_at_least("num_beams", num_beams, 1)
    print(f"[threads: {apply_threads(threads).describe()}]", file=sys.stderr)
    model, tokenizer, precision, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    if is_seq2seq(model):  # the prompt is the encoder's input as given (T5 has no chat template)
        if not prompt:
            raise ValueError("--prompt is empty: give a prompt")
        t0 = time.perf_counter()
        text, n = seq2seq_answer(model, tokenizer, prompt, max_new_tokens, sampling, num_beams, length_penalty,
                                 torch.Generator(device=device).manual_seed(seed))
        print(text)
        print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s, {precision}]", file=sys.stderr)
        return text
    if num_beams > 1:
        raise ValueError("--num_beams is for encoder-decoder checkpoints (T5); decoder models sample or decode greedily")
    ids = encode_prompt(tokenizer, prompt, raw=raw, system=system)
    if not ids:
        raise ValueError("--prompt is empty: give a prompt (or drop --raw to use the chat template)")
    ids = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    compile = wants_compile(compile, min(max_new_tokens, model.max_tokens - len(ids)), device)
    if compile:  # compile before the timed run, for the same cache length, so tokens/s is the decoding rate
        print("[compiling the decode step: about a minute the first time, 7-20 s once inductor has cached it]",
              file=sys.stderr)
        t0 = time.perf_counter()
        warm = generate_tokens(model, ids, max_new_tokens, sampling, generator=torch.Generator(device=device),
                               compiled=True)
        for _ in zip(range(2), warm):  # the prompt, then one compiled step
            pass
        warm.close()
        print(f"[compiled in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    else:
        pack_for_eager_decoding(model)
    text, n, t0 = stream_text(model, tokenizer, ids, max_new_tokens, sampling, stop, generator, compiled=compile)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s, prompt {len(ids)} tokens, {precision}]", file=sys.stderr)
    return text
