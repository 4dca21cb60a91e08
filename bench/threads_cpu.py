"""`leantune generate` tokens/s at the default thread policy vs fixed --threads, idle and under a competing load.

Usage: flock <lock> python bench/threads_cpu.py [--loads 0 2] [--rounds 3] [--new 48] [--quantize int8]
           [--setting NAME=ARGS[;ENV=VALUE...]] [--out threads_cpu]

The settings are any `generate` flags (and environment), e.g. `--setting "eager=--quantize int8 --compile false"
--setting "compiled=--quantize int8 --compile true"` times --compile: the compile time ("[compiled in X s]") is
printed apart from the decoding tokens/s.

Each setting runs the real command line (`python -m leantune.cli generate ...`) in a fresh process, so OpenMP
environment variables and the thread policy take effect as for a user. For each load level, N competitor processes
(a pure Python busy loop each, at the same priority as the benchmark) are started, given a second to show up in the
CPU counters, and stopped after the level's runs. Rounds alternate the settings (the order rotates each round) so
machine noise hits all alike; every run is printed, then the best tokens/s per setting and load, and each setting's
ratio to the best one. Writes bench/results/threads_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, print_table, write_result  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
RATE = re.compile(r"\[(\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s")
THREADS = re.compile(r"\[threads: (.*?)\]")
COMPILED = re.compile(r"\[compiled in ([\d.]+) s\]")
DEFAULT_SETTINGS = ["default=", "threads1=--threads 1", "threads2=--threads 2"]


def parse_setting(text: str) -> tuple[str, list[str], dict[str, str]]:
    """`name=--flag v;ENV=value` -> (name, extra CLI args, extra environment)."""
    name, _, rest = text.partition("=")
    args, *envs = rest.split(";")
    return name, args.split(), dict(e.split("=", 1) for e in envs if e)


def start_competitors(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    if procs:
        time.sleep(1.5)  # let them run long enough to show up in /proc/stat and the load average
    return procs


def stop_competitors(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_generate(a, args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "leantune.cli", "generate", "--checkpoint_dir", str(a.checkpoint_dir), "--prompt",
           PROMPT, "--max_new_tokens", str(a.new), "--temperature", "0", *args]
    if a.quantize:
        cmd += ["--quantize", a.quantize]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"tok_s": 0.0, "wall_s": a.timeout, "policy": "timed out"}
    wall = time.perf_counter() - t
    m = RATE.search(p.stderr)
    if p.returncode or not m:
        raise SystemExit(f"generate failed ({p.returncode}): {p.stderr[-2000:]}")
    policy, compiled = THREADS.search(p.stderr), COMPILED.search(p.stderr)
    return {"tok_s": float(m[3]), "tokens": int(m[1]), "wall_s": round(wall, 1),
            "compile_s": float(compiled[1]) if compiled else None, "policy": policy[1] if policy else "?"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 2], help="competitor processes per level")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=48, help="new tokens per run (greedy)")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--timeout", type=float, default=120.0, help="a run slower than this counts as 0 tokens/s")
    ap.add_argument("--out", default="threads_cpu", help="result name under bench/results")
    ap.add_argument("--setting", action="append", default=None,
                    help="NAME=ARGS[;ENV=VALUE...], repeatable (default: default, --threads 1, --threads 2)")
    a = ap.parse_args()
    settings = [parse_setting(s) for s in (a.setting or DEFAULT_SETTINGS)]
    flags = sorted({f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                    for f in line.split(":")[1].split() if f.startswith(("amx", "avx512_bf16", "avx512f"))})
    model = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    print(f"cpu: {model}, {os.cpu_count()} cpus, flags {' '.join(flags) or 'none of amx/avx512'}; "
          f"{a.new} greedy tokens, quantize {a.quantize or 'none'}", flush=True)
    runs: list[dict] = []
    for load in a.loads:
        procs = start_competitors(load)
        try:
            for r in range(a.rounds):
                order = settings[r % len(settings):] + settings[:r % len(settings)]
                for name, args, env in order:
                    res = {"load": load, "round": r, "setting": name, **run_generate(a, args, env)}
                    runs.append(res)
                    compiled = f"  compile {res['compile_s']:.1f} s" if res.get("compile_s") is not None else ""
                    print(f"load {load} round {r} {name:>10}: {res['tok_s']:6.1f} tok/s  wall {res['wall_s']:5.1f} s"
                          f"{compiled}  threads {res['policy']}", flush=True)
        finally:
            stop_competitors(procs)
    rows = []
    for load in a.loads:
        best = {n: max(x["tok_s"] for x in runs if x["load"] == load and x["setting"] == n) for n, _, _ in settings}
        top = max(best.values())
        for n, _, _ in settings:
            mine = [x for x in runs if x["load"] == load and x["setting"] == n]
            compiles = [x["compile_s"] for x in mine if x.get("compile_s") is not None]
            rows.append({"load": load, "setting": n, "best_tok_s": best[n],
                         "rounds": " ".join(str(x["tok_s"]) for x in mine),
                         "compile_s": " ".join(map(str, compiles)),
                         "best/this": round(top / best[n], 2) if best[n] else "inf"})
    print_table(rows, ["load", "setting", "best_tok_s", "rounds", "best/this", "compile_s"])
    path = write_result(a.out, {"date": time.strftime("%Y-%m-%d"), "cpu": model, "flags": flags,
                                        "new_tokens": a.new, "quantize": a.quantize, "runs": runs, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
