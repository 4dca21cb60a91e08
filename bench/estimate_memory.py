"""`leantune estimate` against measured memory: one real CPU training step per case, in a fresh subprocess.

Run: python bench/estimate_memory.py [--cases N] [--reuse]
Prints (case, estimated GB, measured GB, ratio) and per-component pairs; writes bench/results/estimate_memory.json.
The measurement (leantune.estimate.measure_training_memory) counts live tensor bytes through the CPU allocator's
profiler hooks, so it holds no framework overhead; see its docstring for why it is sound.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_result  # noqa: E402

from leantune.estimate import build_random_model, estimate, measure_training_memory  # noqa: E402
from leantune.models.decoder.config import Config  # noqa: E402

TOLERANCE = 0.15  # |estimated / measured - 1| of the total

# A ~125M-parameter Llama-style model (GQA, SwiGLU, RMSNorm, untied head): big enough that weights, optimizer
# state and activations are all hundreds of MB, small enough for a 2-core CPU.
LLAMA_125M = dict(name="llama-125m", vocab_size=32000, n_layer=12, n_embd=768, n_head=12, n_query_groups=4,
                  intermediate_size=2048, block_size=2048, tie_embeddings=False)

CASES = [  # (method, precision, activation checkpointing, quantize); fp32 first: bf16 matmuls are slow on CPUs
    # without AVX512
    ("lora", "32-true", False, None), ("lora", "32-true", True, None), ("adapter", "32-true", False, None),
    ("adapter_v2", "32-true", False, None), ("full", "32-true", False, None), ("full", "32-true", True, None),
    ("lora", "bf16-true", False, None), ("full", "bf16-true", False, None), ("adapter_v2", "bf16-true", False, None),
    ("adapter", "bf16-true", False, None), ("lora", "bf16-true", True, None),
    ("lora", "32-true", False, "bnb.nf4-dq"), ("lora", "32-true", False, "bnb.int8"),
    ("adapter_v2", "32-true", False, "bnb.nf4"),
]
COMPONENTS = ("weights", "gradients", "optimizer", "activations")


def compare(config: Config, method: str, precision: str, checkpointing: bool, micro_batch_size: int,
            max_seq_length: int, quantize: str | None = None, measured: dict | None = None) -> dict:
    """Estimated and measured GiB for one case. Measured activations = the larger of the forward and backward
    peaks above the resident state (weights, optimizer state, batch) less the gradients, which for PEFT are tiny.
    `measured`: a stored measurement of the same case to reuse (the formulas changed, the step did not)."""
    kw = dict(micro_batch_size=micro_batch_size, max_seq_length=max_seq_length,
              activation_checkpointing=checkpointing)
    est = estimate(config, method, None, precision, quantize=quantize, device="cpu", **kw)
    extra = {"build_model": functools.partial(build_random_model, quantize=quantize)} if quantize else {}
    meas = measured or measure_training_memory(config, method, None, precision, **kw, **extra)
    meas["activations_gb"] = meas["forward_peak_gb"] - meas["baseline_gb"]
    row = dict(case=f"{method} {precision}" + (" ckpt" if checkpointing else "") + (f" {quantize}" if quantize else ""),
               estimated_gb=round(est["total_gb"], 3), measured_gb=round(meas["total_gb"], 3),
               ratio=round(est["total_gb"] / meas["total_gb"], 3))
    for c in COMPONENTS:
        row[f"{c}_est"] = round(est[f"{c}_gb"], 3)
        row[f"{c}_meas"] = round(meas[f"{c}_gb"], 3)
    row["peak_phase"] = max(("forward", "backward", "step"), key=lambda p: meas[f"{p}_peak_gb"])
    row["measured"] = meas
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro_batch_size", type=int, default=2)
    ap.add_argument("--max_seq_length", type=int, default=256)
    ap.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    ap.add_argument("--reuse", action="store_true",
                    help="re-estimate against the measurements stored in bench/results/estimate_memory.json")
    args = ap.parse_args()
    stored = {}
    if args.reuse:
        old = json.loads(Path("bench/results/estimate_memory.json").read_text())
        same = (old["config"] == LLAMA_125M and old["micro_batch_size"] == args.micro_batch_size
                and old["max_seq_length"] == args.max_seq_length)
        stored = {r["case"]: r["measured"] for r in old["rows"]} if same else {}
    torch.set_num_threads(2)
    config = Config(**LLAMA_125M)
    rows = []
    n_params = estimate(config, "full", None, "32-true")["total_params"]
    for method, precision, ckpt, quantize in CASES[: args.cases]:
        t0 = time.perf_counter()
        case = f"{method} {precision}" + (" ckpt" if ckpt else "") + (f" {quantize}" if quantize else "")
        rows.append(compare(config, method, precision, ckpt, args.micro_batch_size, args.max_seq_length, quantize,
                            measured=stored.get(case)))
        print(f"{case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        write_result("estimate_memory", dict(environment=environment(), config=LLAMA_125M, total_params=n_params,
                                             micro_batch_size=args.micro_batch_size,
                                             max_seq_length=args.max_seq_length, tolerance=TOLERANCE, rows=rows))
    print(f"{config.name}: batch {args.micro_batch_size} x {args.max_seq_length} tokens, AdamW, CPU")
    print_table(rows, ["case", "estimated_gb", "measured_gb", "ratio", "peak_phase"])
    print()
    print_table(rows, ["case", *[f"{c}_{s}" for c in COMPONENTS for s in ("est", "meas")]])
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst |ratio - 1| = {worst:.3f} (tolerance {TOLERANCE})")


if __name__ == "__main__":
    main()
