"""CPU prompt processing (prefill) under weight-only int8/int4 against fp32, side by side in one process.

Usage: python bench/prefill_cpu.py [--threads 2] [--tokens 42,512] [--rounds 3]

Each row times one prompt's forward (every position through the blocks, the LM head on the last one, the KV cache
filled), as generate and chat run it before their first token; prompt tokens/s = tokens / time. "<mode> kernels" is
the path before the dense prefill copy (every prompt row through the int8/int4 matrix-vector kernels, which
`leantune.decode.woq.DENSE_BATCH` set out of reach gives back); "<mode>" is the current path (prompts of DENSE_BATCH
or more positions multiply with the layer's prepacked bfloat16 copy, made on the first prompt: the warm-up, not
timed). Rounds alternate over the rows; the best round counts and every round is printed.
Writes bench/results/prefill_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, environment, print_table, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="42,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="int8,int4")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import leantune.decode.woq as woq
    from leantune.inference import load_for_inference

    dense_rows = woq.DENSE_BATCH
    models = {"fp32": load_for_inference(a.checkpoint_dir, "32-true")[0]}
    for m in a.modes.split(","):
        models[m] = load_for_inference(a.checkpoint_dir, "32-true", quantize=m)[0]
    runs = {"fp32": ("fp32", dense_rows)}
    for m in a.modes.split(","):
        runs[f"{m} kernels"] = (m, 1 << 30)
        runs[m] = (m, dense_rows)
    lengths = [int(t) for t in a.tokens.split(",")]
    ids = torch.randint(100, 20000, (max(*lengths, 16),), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def prefill(model, n: int) -> float:
        model.set_kv_cache(1, n + 1)
        try:
            t = time.perf_counter()
            hidden = model.decode(ids[None, :n], torch.arange(n), return_hidden=True)[:, -1]  # (1, C)
            model.lm_head(hidden)
            return time.perf_counter() - t
        finally:
            model.clear_kv_cache()

    for m, rows in runs.values():  # warm-up: makes the dense copies
        woq.DENSE_BATCH = rows
        prefill(models[m], 16)
    times = {(name, n): [] for name in runs for n in lengths}
    for r in range(a.rounds):
        for n in lengths:
            for name, (m, rows) in runs.items():
                woq.DENSE_BATCH = rows
                times[name, n].append(prefill(models[m], n))
        print(f"round {r + 1}: " + ", ".join(f"{k[0]}@{k[1]} {k[1] / v[-1]:.0f} tok/s" for k, v in times.items()),
              flush=True)
    woq.DENSE_BATCH = dense_rows
    rows_out = []
    for (name, n), ts in times.items():
        fp32 = min(times["fp32", n])
        rows_out.append({"path": name, "prompt_tokens": n, "tok_s": round(n / min(ts), 1), "ms": round(1000 * min(ts), 1),
                         "rounds_tok_s": [round(n / t, 1) for t in ts], "vs_fp32": round(fp32 / min(ts), 2)})
    print_table(rows_out, ["path", "prompt_tokens", "tok_s", "ms", "rounds_tok_s", "vs_fp32"])
    path = write_result("prefill_cpu", {"env": environment(), "threads": a.threads, "prefill": rows_out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
