"""The llama.cpp side of bench/decode_cpu.py --llama_cpp: leantune's own GGUF exports of the model (f16, q8_0),
q4_0 and Q4_K_M quantized from the f16 file by llama.cpp itself, and greedy decoding through llama-cpp-python.

llama-cpp-python is an optional bench dependency built by bench/llama_cpp_setup.sh (never in CI); this module
imports it only inside `require_llama_cpp`, so `decode_cpu.py --help` works without it.
Both sides get the same token ids: leantune's chat-rendered prompt ids go to llama.cpp as they are, so tokenization
cannot differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

SETUP = "bench/llama_cpp_setup.sh"
EXPORTED = ("f16", "q8_0")  # written by leantune's GGUF export
QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # made from the f16 file


def require_llama_cpp():
    """The llama_cpp module, or exit with one line naming the setup script."""
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"--llama_cpp needs llama-cpp-python in this Python ({e}); build it once with "
                         f"`bash {SETUP}`") from None
    return llama_cpp


def make_gguf_files(checkpoint_dir: Path, out_dir: Path, threads: int) -> dict[str, Path]:
    """{file type: path}: f16 and q8_0 through leantune's export of the base (no adapter), as
    `leantune export --format gguf --gguf_type f16|q8_0` writes them, then q4_0 and Q4_K_M from the f16 file with
    llama.cpp's own quantizer."""
    from leantune.export import export_gguf_file

    llama_cpp = require_llama_cpp()
    files = {t: export_gguf_file(checkpoint_dir, None, out_dir / f"model-{t}.gguf", gguf_type=t) for t in EXPORTED}
    for name, ftype in QUANTIZED.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = threads
        path = out_dir / f"model-{name}.gguf"
        with captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(path).encode(), ctypes.byref(params))
        if rc != 0:
            sys.stderr.write(log[0])
            raise RuntimeError(f"llama_model_quantize to {name} failed (code {rc})")
        fallbacks = Counter(re.findall(r"falling back to\s+(\S+)", log[0]))
        if fallbacks:  # k-quants need rows of 256: the default model's 576-wide tensors get other types
            print(f"{name}: llama.cpp quantized {sum(fallbacks.values())} tensors with a fallback type (row length "
                  "not a multiple of 256): " + ", ".join(f"{n} {t}" for t, n in sorted(fallbacks.items())), flush=True)
        files[name] = path
    return files


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 (llama.cpp's per-tensor quantize log) into the yielded list's
    only item, instead of the terminal."""
    out = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out[0] = f.read()


def load(path: Path, threads: int, n_ctx: int, n_batch: int, flash_attn: bool = False):
    """A llama.cpp model on `threads` threads for both the prompt and the one-token steps; n_batch covers the
    longest prompt, so a prompt is evaluated in one batch as leantune's prompt forward is. flash_attn=False is
    llama-cpp-python's default; with it a 512-token q8_0 prompt ran ~1.25x faster here."""
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False)


def greedy(llm, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Up to n greedy tokens after the prompt ids (temperature 0, top_k 1: llama.cpp's greedy sampler); stops before
    a stop id, which is not included (as greedy_batch does). The KV cache is emptied first, so the prompt is always
    evaluated whole (llama-cpp-python would otherwise reuse a cached common prefix)."""
    llm.reset()
    out: list[int] = []
    stop = set(stop_ids)
    if n <= 0:
        return out
    for token in llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop:
            break
        out.append(int(token))
        if len(out) == n:
            break
    return out
