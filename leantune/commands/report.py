"""`leantune report RUN_OR_SWEEP...`: compare runs and sweeps on one self-contained HTML page (and a markdown twin)."""

from __future__ import annotations

from pathlib import Path

from leantune.report import write_report


def report(runs: list[Path], out: Path | None = None, markdown: bool = True) -> dict:
    """Compare finetune runs and sweeps: a table of settings and results (objective, exact match, validation loss,
    tokens/s, wall time, peak memory, trainable parameters; the best per column marked), overlaid loss curves, the
    objective against each swept parameter, time and memory per method, and each run's answer to the first held-out
    prompt. The page is one file that needs no network (plots embedded); OUT.md beside it is its markdown twin.

    Args:
        runs: Run folders (`leantune finetune --out_dir`) and sweep folders (`leantune sweep --out_dir`).
        out: The HTML file to write (default: report.html in the first folder given).
        markdown: Also write the markdown twin (OUT.md, with the plots as PNG files beside it).
    """
    if not runs:
        raise ValueError("give one or more run or sweep folders: leantune report out/sweep/NAME")
    out = Path(out) if out is not None else Path(runs[0]) / "report.html"
    result = write_report([Path(r) for r in runs], out, markdown=markdown)
    print(f"report: {result['html']} ({result['runs']} runs, {result['plots']} plots)"
          + (f"; markdown: {result['markdown']}" if markdown else ""))
    return result
