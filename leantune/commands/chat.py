"""`leantune chat`: a multi-turn terminal chat that keeps the history in the model's chat template.

Input: one line per message; end a line with `\\` to continue on the next, or put `\"\"\"` alone on a line to start and
end a pasted block. Commands: /reset, /save FILE (the conversation as OpenAI-style `{"messages": [...]}` JSON, which
`--data JSON` reads back), /help, /exit. When the history no longer fits the context window beside the answer's
budget, the oldest turns are dropped (never the system message) and a notice says how many.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from leantune.checkpoint.io import write_json
from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_seed, check_threads
from leantune.cpu_threads import apply_threads
from leantune.decode.compile import wants_compile
from leantune.decode.generate import Sampling, bos_for_rendered, stream_text
from leantune.download import DEFAULT_CHECKPOINT
from leantune.inference import load_for_inference, pack_for_eager_decoding

HELP = ('commands: /reset clears the history, /save FILE writes the conversation as JSON, /exit (or Ctrl-D) quits; '
        'end a line with \\ to continue it, or open and close a multi-line block with """')
BLOCK = '"""'


def read_message(prompt: str = ">> ", more: str = ".. ") -> str | None:
    """One user message from stdin (None at end of input): a line, lines joined by a trailing backslash, or the
    lines between two \"\"\" lines (kept verbatim)."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == BLOCK:
        lines = []
        while True:
            try:
                line = input(more)
            except EOFError:
                break  # an unclosed block at end of input still counts
            if line.strip() == BLOCK:
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = input(more)
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


def render(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, bos=bos_for_rendered(tokenizer, text))


def fit_history(tokenizer, history: list[dict], limit: int) -> tuple[list[int], int]:
    """(prompt ids, turns dropped): drop the oldest user/assistant turns, in place, until the rendered prompt has at
    most `limit` tokens. The system message and the newest user message always stay (the caller checks that those
    alone fit)."""
    dropped = 0
    ids = render(tokenizer, history)
    first = 1 if history and history[0]["role"] == "system" else 0
    while len(ids) > limit and len(history) - first > 1:
        end = first + 1  # the oldest user message and the answers that followed it, up to the next user message
        while end < len(history) - 1 and history[end]["role"] != "user":
            end += 1
        del history[first:end]
        dropped += 1
        ids = render(tokenizer, history)
    return ids, dropped


def save_conversation(path: str, history: list[dict]) -> Path:
    if not path:
        raise ValueError("/save needs a file name, e.g. /save chat.json")
    return write_json(Path(path).expanduser(), {"messages": history})


def cut_off_notice(budget: int, max_new_tokens: int, context: int) -> str:
    """Why an answer stopped before the model ended it, and how to give it more room."""
    if budget < max_new_tokens:
        return (f"[the answer stopped at {budget} tokens, the room left in the model's {context}-token context; "
                "/reset starts a new conversation with more room]")
    return (f"[the answer stopped at --max_new_tokens {max_new_tokens} and may be cut off; start chat with a larger "
            "--max_new_tokens to allow longer answers]")


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
    threads: int | None = None,
    compile: bool | None = None,
) -> None:
    """Chat with a model in the terminal. End a line with \\ to continue it, or wrap a pasted block in \"\"\" lines;
    /reset clears the history, /save FILE writes the conversation as JSON, /exit (or Ctrl-D) quits. The oldest turns
    are dropped, with a notice, when the history outgrows the context window.

    Args:
        checkpoint_dir: A Hugging Face model folder with a chat template.
        adapter: An adapter folder (any method) or a PEFT folder, applied unmerged on the base.
        system: Optional system message.
        max_new_tokens: Most tokens per answer (room for them is kept in the context window).
        temperature: Sampling temperature; 0 (or anything below 1e-5) means greedy.
        top_k: Sample among the k most likely tokens.
        top_p: Nucleus sampling mass in (0, 1].
        precision: 32-true, bf16-true, 16-true.
        quantize: int8 or int4 for fast weight-only CPU decoding; or a bitsandbytes mode (bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq, bnb.int8) as a QLoRA adapter was trained with.
        seed: Random seed for sampling.
        threads: CPU threads for torch (default: one per usable CPU; when the machine is busy at start, OpenMP's
            threads sleep instead of spinning while they wait, so other work cannot stall every op; the choice
            is printed).
        compile: Compile the one-token decode step (see `leantune generate --help`): faster answers after a first
            compile of about a minute on 2 CPU cores (7-20 s later, from inductor's cache). Unset (the default):
            only when --max_new_tokens is at least 1024; true always, false never.
    """
    sampling = Sampling(temperature, top_k, top_p)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_seed(seed)
    check_threads(threads)
    check_model_flags(precision, quantize, inference=True)
    check_folder("adapter", adapter)
    choice = apply_threads(threads)
    model, tokenizer, _, device = load_for_inference(checkpoint_dir, precision, adapter, quantize)
    if not tokenizer.chat_template:
        raise ValueError(f"{checkpoint_dir} has no chat template; use `leantune generate --raw true` instead")
    generator = torch.Generator(device=device).manual_seed(seed)
    start: list[dict] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    context = model.max_tokens
    reserve = min(max_new_tokens, context // 2)  # room kept for the answer; half the window at most
    print(f"chat: {HELP}", file=sys.stderr)
    print(f"[threads: {choice.describe()}]", file=sys.stderr)
    compile = wants_compile(compile, reserve, device)
    if compile:
        print("[--compile: the first answer waits for the decode step to compile (about a minute the first time)]",
              file=sys.stderr)
    else:
        pack_for_eager_decoding(model)
    while True:
        user = read_message()
        if user is None:
            print()
            return
        command, _, arg = user.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = list(start)
            print("[history cleared]", file=sys.stderr)
            continue
        if command == "/help":
            print(HELP, file=sys.stderr)
            continue
        if command == "/save":
            try:
                print(f"[saved {len(history)} messages to {save_conversation(arg.strip(), history)}]", file=sys.stderr)
            except (ValueError, OSError) as e:
                print(f"[not saved: {e}]", file=sys.stderr)
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        if len(render(tokenizer, [*start, history[-1]])) > context - 1:
            print(f"[that message is longer than the model's {context}-token context; not sent]", file=sys.stderr)
            history.pop()
            continue
        ids, dropped = fit_history(tokenizer, history, max(context - reserve, 1))
        if len(ids) > context - 1:  # the newest message fits only with less room for the answer
            ids, more = fit_history(tokenizer, history, context - 1)
            dropped += more
        if dropped:
            print(f"[dropped the {dropped} oldest turn(s) to fit the {context}-token context; "
                  f"{len(ids)} prompt tokens]", file=sys.stderr)
        budget = min(max_new_tokens, context - len(ids))
        answer, generated, _ = stream_text(model, tokenizer, torch.tensor(ids, dtype=torch.long), budget, sampling,
                                           None, generator, compiled=compile)
        print()
        if generated >= budget:  # no end-of-answer token came within the budget: say so, the reply reads complete
            print(cut_off_notice(budget, max_new_tokens, context), file=sys.stderr)
        history.append({"role": "assistant", "content": answer})
