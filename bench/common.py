"""Shared bits of the side-by-side benchmarks: environment facts and JSON output."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")


def environment() -> dict:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    env.update(cpu_facts())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def cpu_facts() -> dict:
    """The CPU model and the flags that decide bf16/int8 speed (CPU timings mean little without them)."""
    facts: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor()}
    for line in text.splitlines():
        if line.startswith("model name") and "cpu" not in facts:
            facts["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and "cpu_flags" not in facts:
            have = set(line.split(":", 1)[1].split())
            facts["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                                              "amx_int8") if f in have]
    return facts


def write_result(name: str, result: dict, out_dir: Path = Path("bench/results")) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
