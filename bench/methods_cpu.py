"""Every finetuning method on the main job, side by side: trainable parameters, held-out exact match on Demo before
and after the same number of steps, tokens/s and peak memory, one `leantune finetune <method>` process each (same
model, data, batch, steps, seed and threads), one table.

Usage: python bench/methods_cpu.py [--methods lora,dora,ia3] [--steps 50] [--threads 2] [--append] [--out NAME]
       python bench/methods_cpu.py --merge part1 part2 [--out NAME]
--append keeps the rows of bench/results/<NAME>.json (default methods_cpu) for methods not given (to finish an
interrupted run); parts run side by side with their own --out are joined with --merge (later parts win per method).
Each method uses its default hyperparameters and learning rate (the point of the table: do the defaults work?).
Writes bench/results/methods_cpu.json. On 2 CPU cores each method takes about 5-8 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, environment, print_table, write_result  # noqa: E402

from leantune.methods import METHODS  # noqa: E402


def run(method: str, steps: int, threads: int, checkpoint_dir: Path, out_root: Path) -> dict:
    out = out_root / method
    cmd = [sys.executable, "-m", "leantune.cli", "finetune", method, "--checkpoint_dir", str(checkpoint_dir),
           "--out_dir", str(out), "--train.max_steps", str(steps), "--threads", str(threads),
           "--eval.sample_new_tokens", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    s = json.loads((out / "summary.json").read_text())
    return {"method": method, "trainable": f"{s['trainable_params']:,}",
            "exact match": f"{s.get('exact_match_before', 0):.0%} -> {s.get('exact_match_after', 0):.0%}",
            "val loss": f"{s['val_loss']:.3f}", "tok/s": s["tokens_per_s"], "peak GB": s["peak_memory_gb"],
            "train s": s["time_s"], "wall s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(n for n, m in METHODS.items()
                                                  if m.variant_of is None and not m.default_quantize))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--append", action="store_true", help="keep earlier rows of methods not run now")
    ap.add_argument("--out", default="methods_cpu", help="result name: bench/results/<out>.json")
    ap.add_argument("--merge", nargs="+", metavar="NAME", help="join the rows of these result names into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    rows = []
    chosen = args.methods.split(",")
    previous = Path(f"bench/results/{args.out}.json")
    if args.append and previous.is_file():
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["method"] not in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        for method in chosen:
            rows.append(run(method, args.steps, args.threads, args.checkpoint_dir, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            # after every method, so an interrupted run keeps what it measured
            path = write_result(args.out, {"env": environment(), "steps": args.steps, "rows": rows})
    print_table(rows, ["method", "trainable", "exact match", "val loss", "tok/s", "peak GB", "train s", "error"])
    print(f"wrote {path}")


def merge(names: list[str], out: str) -> None:
    """One table from parts measured side by side (same steps required); a method in a later part replaces it."""
    parts = [json.loads(Path(f"bench/results/{n}.json").read_text()) for n in names]
    if len({p["steps"] for p in parts}) > 1:
        raise SystemExit(f"parts differ in --steps: {[p['steps'] for p in parts]}")
    rows = {}
    for p in parts:
        rows.update({r["method"]: r for r in p["rows"]})
    path = write_result(out, {"env": parts[-1]["env"], "steps": parts[0]["steps"], "rows": list(rows.values())})
    print(f"merged {len(rows)} rows into {path}")


if __name__ == "__main__":
    main()
