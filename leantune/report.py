"""`leantune report`: one self-contained HTML page (and its markdown twin) comparing finetune runs or a sweep's
trials: settings and results with the best per column marked, overlaid loss curves, the objective against each swept
parameter, time and memory per method, and each run's answer to a held-out prompt side by side.

Everything read from the folders is data: text is HTML-escaped, nothing is unpickled or executed. The page needs no
network: plots are matplotlib PNGs embedded as base64, the style is inline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantune.checkpoint.io import atomic_write_bytes

SWEEP_FILE = "sweep.json"
# (key, header, better): the result columns, best marked per column
RESULTS = [("objective", "objective", None), ("exact_match_after", "exact match", "max"),
           ("val_loss", "val loss", "min"), ("tokens_per_s", "tokens/s", "max"), ("time_s", "wall time (s)", "min"),
           ("peak_memory_gb", "peak memory (GB)", "min"), ("trainable_params", "trainable params", "min")]
SETTING_KEYS = ("method", "quantize", "precision", "lora", "optimizer", "train", "data")


@dataclass
class Run:
    name: str
    folder: Path | None
    state: str = "complete"
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    sample: str | None = None
    answers: list[dict] = field(default_factory=list)


@dataclass
class Comparison:
    runs: list[Run]
    swept: list[str]
    objective: str | None = None
    direction: str | None = None
    titles: list[str] = field(default_factory=list)


def load(paths: list[Path]) -> Comparison:
    """Runs from run folders (summary.json, metrics.csv) and sweep folders (sweep.json and its trials' folders)."""
    runs: list[Run] = []
    swept: list[str] = []
    objective = direction = None
    titles = []
    for path in map(Path, paths):
        if (path / SWEEP_FILE).is_file():
            sweep = _read_json(path / SWEEP_FILE)
            objective, direction = sweep.get("objective"), sweep.get("direction")
            swept += [s for s in sweep.get("swept", []) if s not in swept]
            titles.append(f"sweep {sweep.get('name', path.name)}")
            runs += [trial_run(path, t) for t in sweep.get("trials", [])]
        elif (path / "summary.json").is_file() or (path / "metrics.csv").is_file():
            runs.append(folder_run(path, path.name))
            titles.append(path.name)
        else:
            raise FileNotFoundError(f"{path}: neither a run folder (summary.json, metrics.csv) nor a sweep folder "
                                    f"({SWEEP_FILE}); give folders that `leantune finetune` or `leantune sweep` wrote")
    if not runs:
        raise ValueError(f"{', '.join(map(str, paths))}: no runs to report (the sweep has no trials yet)")
    _unique_names(runs)
    if not swept:
        swept = differing_settings(runs)
    return Comparison(runs, swept, objective, direction, titles)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def trial_run(sweep_dir: Path, trial: dict) -> Run:
    folder = Path(trial["run_dir"]) if trial.get("run_dir") else None
    if folder is not None and not folder.is_dir():  # a sweep folder moved, or trials run on another machine
        moved = sweep_dir / "trials" / folder.name
        folder = moved if moved.is_dir() else None
    run = folder_run(folder, f"trial-{trial['number']:03d}") if folder is not None else Run(f"trial-{trial['number']:03d}", None)
    run.state = trial.get("state", "complete")
    run.error = trial.get("error")
    settings = dict(trial.get("settings") or {})  # the flags as the trial ran: references resolved ({2*--lora.r})
    run.settings = {**settings, **{k: _group_text(v) if isinstance(v, dict) else settings.get(k, v)
                                   for k, v in _decoded(trial.get("params", {})).items()}}
    for key, _, _ in RESULTS:
        if trial.get(key) is not None and key not in run.results:
            run.results[key] = trial[key]
    if trial.get("value") is not None:
        run.results["objective"] = trial["value"]
    return run


def _group_text(group: dict) -> str:
    """A swept group of flags as one short label: {"--lora.targets": ["query", "value"]} -> lora.targets=query,value."""
    return " ".join(f"{str(k).removeprefix('--')}={','.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in group.items())


def _decoded(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def folder_run(folder: Path, name: str) -> Run:
    run = Run(name, folder)
    if (folder / "summary.json").is_file():
        summary = _read_json(folder / "summary.json")
        run.results = {k: summary[k] for k, _, _ in RESULTS if k in summary}
        run.sample = summary.get("sample") if isinstance(summary.get("sample"), str) else None
        answers = summary.get("heldout_answers")
        if isinstance(answers, list):
            run.answers = [a for a in answers if isinstance(a, dict) and isinstance(a.get("prompt"), str)]
    else:
        run.state = "unfinished"
    config = folder / "final" / "run.json"
    if config.is_file():
        run.settings = flatten({k: v for k, v in _read_json(config).items() if k in SETTING_KEYS})
    run.curve, run.val_curve = read_curves(folder / "metrics.csv")
    return run


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"--{key}." if not prefix else f"{key}."))
        else:
            out[key] = v
    return out


def read_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    loss, val = [], []
    if not path.is_file():
        return loss, val
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                if r.get("loss"):
                    loss.append((int(r["step"]), float(r["loss"])))
                if r.get("val_loss"):
                    val.append((int(r["step"]), float(r["val_loss"])))
            except (TypeError, ValueError):
                continue  # a torn last line of a run still writing
    return loss, val


def differing_settings(runs: list[Run]) -> list[str]:
    """The settings whose values differ between the runs (what a hand-made comparison varied), method first."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    differ = [k for k in keys if len({json.dumps(r.settings.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    return sorted(differ, key=lambda k: (k != "method", keys.index(k)))


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({seen[r.name]})"


def best_marks(c: Comparison) -> dict[str, float]:
    """{column: best value} over the completed runs."""
    marks = {}
    for key, _, better in RESULTS:
        better = better or ("min" if c.direction == "minimize" else "max")
        values = [float(r.results[key]) for r in c.runs if r.state == "complete" and _number(r.results.get(key))]
        if values:
            marks[key] = min(values) if better == "min" else max(values)
    return marks


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def columns(c: Comparison) -> list[tuple[str, str, str | None]]:
    return [col for col in RESULTS if any(r.results.get(col[0]) is not None for r in c.runs)]


# ---- plots (matplotlib, Agg) ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return buf.getvalue()


def plots(c: Comparison) -> list[tuple[str, bytes]]:
    """(title, PNG) of each figure the runs have data for."""
    plt = _pyplot()
    out = []
    curves = [r for r in c.runs if r.curve]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for r in curves:
            line, = ax.plot(*zip(*r.curve), label=r.name, linewidth=1.2)
            if r.val_curve:
                ax.plot(*zip(*r.val_curve), "o--", color=line.get_color(), markersize=3, linewidth=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (dashed: validation)")
        ax.grid(alpha=0.3)
        if len(curves) <= 16:
            ax.legend(fontsize=7, ncol=2)
        out.append(("Loss curves", _png(fig)))
    key = "objective" if any(r.results.get("objective") is not None for r in c.runs) else "val_loss"
    done = [r for r in c.runs if _number(r.results.get(key))]
    for param in c.swept:
        pts = [(fmt(r.settings.get(param)), float(r.results[key])) for r in done if param in r.settings]
        labels = list(dict.fromkeys(p for p, _ in pts))
        if len(labels) < 2:  # a parameter every run shares (e.g. a one-value seed list) says nothing
            continue
        numeric = all(_is_float(p) for p in labels)
        fig, ax = plt.subplots(figsize=(5, 3.4))
        if numeric:
            ax.scatter([float(p) for p, _ in pts], [v for _, v in pts])
            if len(labels) > 2 and min(float(p) for p in labels) > 0 and max(float(p) for p in labels) / min(float(p) for p in labels) > 50:
                ax.set_xscale("log")
        else:
            ax.scatter([labels.index(p) for p, _ in pts], [v for _, v in pts])
            ax.set_xticks(range(len(labels)), [lb[:24] for lb in labels], rotation=20, fontsize=7)
        ax.set_xlabel(param)
        ax.set_ylabel(c.objective if key == "objective" and c.objective else key)
        ax.grid(alpha=0.3)
        out.append((f"{c.objective if key == 'objective' else key} vs {param}", _png(fig)))
    by_method: dict[str, list[Run]] = {}
    for r in c.runs:
        if _number(r.results.get("time_s")) or _number(r.results.get("peak_memory_gb")):
            by_method.setdefault(str(r.settings.get("method", "?")), []).append(r)
    if by_method:
        names = list(by_method)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, k, label in ((a1, "time_s", "wall time (s)"), (a2, "peak_memory_gb", "peak memory (GB)")):
            vals = [_mean([r.results.get(k) for r in by_method[m]]) for m in names]
            ax.bar(range(len(names)), vals, color="#4a7ab5")
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
        out.append(("Time and memory per method (mean over runs)", _png(fig)))
    return out


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _mean(values: list) -> float:
    nums = [float(v) for v in values if _number(v)]
    return sum(nums) / len(nums) if nums else 0.0


# ---- the page and its twin ----

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0;
font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}.best{background:#d9f2d9;font-weight:bold}
.failed,.pruned{color:#a33}figure{display:inline-block;margin:8px}img{max-width:100%}pre{white-space:pre-wrap;
margin:0;font-size:12px}"""


def answer_grid(c: Comparison) -> tuple[list[tuple[str, str]], list[Run]]:
    """(prompt, expected) rows in first-seen order, and the runs that answered held-out prompts."""
    runs = [r for r in c.runs if r.answers]
    prompts = list(dict.fromkeys((a["prompt"], str(a.get("expected", ""))) for r in runs for a in r.answers))
    return prompts, runs


def _answer(run: Run, prompt: str) -> dict | None:
    return next((a for a in run.answers if a["prompt"] == prompt), None)


def _answer_cell(run: Run, prompt: str) -> str:
    a = _answer(run, prompt)
    if a is None:
        return "<td></td>"
    mark = {True: " class='best'", False: ""}.get(a.get("right"), "")
    return f"<td{mark}><pre>{html.escape(str(a.get('answer', '')))}</pre></td>"


def render_html(c: Comparison, figures: list[tuple[str, bytes]]) -> str:
    e = html.escape
    best = best_marks(c)
    cols = columns(c)
    head = "".join(f"<th>{e(h)}</th>" for h in ["run", "state", *c.swept] + [h for _, h, _ in cols])
    rows = []
    for r in c.runs:
        cells = [f"<td>{e(r.name)}</td>", f"<td class='{e(r.state)}'>{e(r.state)}"
                 + (f"<br><small>{e(r.error)}</small>" if r.error else "") + "</td>"]
        cells += [f"<td>{e(fmt(r.settings.get(s)))}</td>" for s in c.swept]
        for key, _, _ in cols:
            v = r.results.get(key)
            mark = " best" if r.state == "complete" and _number(v) and key in best and float(v) == best[key] else ""
            cells.append(f"<td class='num{mark}'>{e(fmt(v))}</td>")
        rows.append(f"<tr class='run'>{''.join(cells)}</tr>")
    figs = "".join(f"<figure><img alt='{e(t)}' src='data:image/png;base64,{base64.b64encode(p).decode()}'>"
                   f"<figcaption>{e(t)}</figcaption></figure>" for t, p in figures)
    samples = [r for r in c.runs if r.sample]
    answers = ""
    prompts, with_answers = answer_grid(c)
    if prompts:
        answers = ("<h2>Answers to held-out prompts</h2><table id='answers'><tr><th>prompt</th><th>expected</th>"
                   + "".join(f"<th>{e(r.name)}</th>" for r in with_answers) + "</tr>"
                   + "".join("<tr><td><pre>" + e(p) + "</pre></td><td><pre>" + e(exp) + "</pre></td>"
                             + "".join(_answer_cell(r, p) for r in with_answers) + "</tr>" for p, exp in prompts)
                   + "</table>")
    elif samples:
        answers = ("<h2>Answers to the first held-out prompt</h2><table id='answers'><tr>"
                   + "".join(f"<th>{e(r.name)}</th>" for r in samples) + "</tr><tr>"
                   + "".join(f"<td><pre>{e(r.sample or '')}</pre></td>" for r in samples) + "</tr></table>")
    objective = (f"<p>Objective: <b>{e(c.objective)}</b> ({e(c.direction or '')}). </p>" if c.objective else "")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>leantune report</title>"
            "<link rel='icon' href='data:,'>"
            f"<style>{CSS}</style></head><body><h1>leantune report: {e(', '.join(c.titles))}</h1>{objective}"
            "<p>Best value per column in <span class='best'>bold green</span> (completed runs).</p>"
            f"<table id='runs'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<h2>Plots</h2>{figs}{answers}</body></html>")


def render_markdown(c: Comparison, figure_files: list[tuple[str, str]]) -> str:
    best = best_marks(c)
    cols = columns(c)
    header = ["run", "state", *c.swept] + [h for _, h, _ in cols]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# leantune report: {', '.join(c.titles)}", ""]
    if c.objective:
        lines += [f"Objective: **{c.objective}** ({c.direction}). Best per column in bold.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in c.runs:
        row = [r.name, r.state + (f": {r.error}" if r.error else "")] + [fmt(r.settings.get(s)) for s in c.swept]
        for key, _, _ in cols:
            v = r.results.get(key)
            text = fmt(v)
            if r.state == "complete" and _number(v) and key in best and float(v) == best[key]:
                text = f"**{text}**"
            row.append(text)
        lines.append("| " + " | ".join(cell(x) for x in row) + " |")
    lines.append("")
    lines += [f"![{t}]({f})" for t, f in figure_files]
    samples = [r for r in c.runs if r.sample]
    prompts, with_answers = answer_grid(c)
    if prompts:
        lines += ["", "## Answers to held-out prompts (bold: right)", "",
                  "| prompt | expected | " + " | ".join(cell(r.name) for r in with_answers) + " |",
                  "|" + "---|" * (2 + len(with_answers))]
        for p, exp in prompts:
            row = []
            for r in with_answers:
                a = _answer(r, p)
                text = cell(str(a.get("answer", ""))) if a else ""
                row.append(f"**{text}**" if a and a.get("right") and text else text)
            lines.append(f"| {cell(p)} | {cell(exp)} | " + " | ".join(row) + " |")
    elif samples:
        lines += ["", "## Answers to the first held-out prompt", "", "| run | answer |", "|---|---|"]
        lines += [f"| {cell(r.name)} | {cell(r.sample or '')} |" for r in samples]
    return "\n".join(lines) + "\n"


def write_report(paths: list[Path], out: Path, markdown: bool = True) -> dict[str, Any]:
    """Write OUT (.html) and, with `markdown`, its twin OUT.md with the plots beside it as PNG files."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out}: the report is an HTML file; give a name ending in .html")
    c = load(paths)
    figures = plots(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, render_html(c, figures).encode("utf-8"))
    result = {"html": str(out), "markdown": None, "runs": len(c.runs), "plots": len(figures)}
    if not markdown:
        return result
    files = []
    for i, (title, png) in enumerate(figures):
        name = f"{out.stem}-{i + 1}.png"
        atomic_write_bytes(out.parent / name, png)
        files.append((title, name))
    md = out.with_suffix(".md")
    atomic_write_bytes(md, render_markdown(c, files).encode("utf-8"))
    return {**result, "markdown": str(md)}
