"""CPU generation tokens/s: leantune's KV-cache loop vs transformers `generate`, same model, prompt and threads.

Usage: python bench/generate_cpu.py [--threads 2] [--new 128] [--rounds 3]
Both generate exactly --new tokens greedily (no early stop) from the same chat-rendered prompt; rounds alternate
between the two so machine noise hits both alike. Prints a table and writes bench/results/generate_cpu.json.
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
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.decode.generate import encode_prompt, generate_tokens
    from leantune.tokenizer import Tokenizer

    tok = Tokenizer(a.checkpoint_dir)
    ids = torch.tensor(encode_prompt(tok, "Write a short story about a robot who learns to paint."))
    ours = load_hf_checkpoint(a.checkpoint_dir).eval()
    hf = AutoModelForCausalLM.from_pretrained(a.checkpoint_dir, dtype=torch.float32).eval()

    def run_ours(n: int) -> list[int]:
        return list(generate_tokens(ours, ids, n))

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=tok.pad_id)
        return out[0, len(ids):].tolist()

    run_ours(8), run_hf(8)  # warm-up
    times = {"leantune": [], "transformers": []}
    outputs = {}
    for _ in range(a.rounds):
        for name, fn in (("leantune", run_ours), ("transformers", run_hf)):
            t = time.perf_counter()
            outputs[name] = fn(a.new)
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, ts in times.items():
        best = min(ts)
        rows.append({"tool": name, "new_tokens": a.new, "best_s": round(best, 3), "tok_s": round(a.new / best, 1)})
    ratio = rows[0]["tok_s"] / rows[1]["tok_s"]
    same = outputs["leantune"] == outputs["transformers"]
    print_table(rows, ["tool", "new_tokens", "best_s", "tok_s"])
    print(f"ratio leantune/transformers: {ratio:.2f}x; identical greedy tokens: {same}")
    path = write_result("generate_cpu", {"env": environment(), "prompt_tokens": len(ids), "rows": rows,
                                         "ratio": round(ratio, 3), "identical_tokens": same})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
