"""`leantune data preview`: show rendered samples with the supervised spans marked, and length statistics.

Answers "what will the model actually be trained on?" before any compute is spent.
"""

from __future__ import annotations

from typing import Any

from leantune.data.sft import IGNORE_INDEX, Sample

GREEN, RESET = "\033[32m", "\033[0m"


def render_sample(sample: Sample, tokenizer: Any, color: bool = False) -> str:
    """Decoded text of a sample, trained-on spans in green (or [[...]] without a terminal)."""
    ids = sample.input_ids.tolist()
    target = [False] + [int(x) != IGNORE_INDEX for x in sample.labels.tolist()[:-1]]  # is token t a target?
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or target[t] != target[start]:
            text = tokenizer.decode(ids[start:t])
            if target[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = t
    return "".join(out)


def format_stats(stats: dict[str, Any]) -> str:
    lines = []
    for split in ("train", "val"):
        s = stats.get(split, {})
        if not s.get("count"):
            lines.append(f"{split}: 0 samples")
            continue
        lines.append(f"{split}: {s['count']} samples, {s['tokens']} tokens; length min {s['min']} / mean {s['mean']} / "
                     f"median {s['median']} / p95 {s['p95']} / max {s['max']}; {s['over_max_seq_length']} over "
                     f"max_seq_length {stats['max_seq_length']} ({s['truncated']} truncated); supervised "
                     f"{s['supervised_fraction']:.1%} of tokens")
    for reason, n in stats.get("skipped", {}).items():
        lines.append(f"skipped {n}: {reason}")
    return "\n".join(lines)


def render_pair(pair: Any, tokenizer: Any, color: bool = False) -> str:
    """A preference pair: the prompt once, then each response marked as trained on (both are scored)."""
    def mark(ids: list[int]) -> str:
        text = tokenizer.decode(ids)
        return f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"

    return (f"{tokenizer.decode(pair.prompt)}\n  chosen:   {mark(pair.chosen)}\n  rejected: {mark(pair.rejected)}")
