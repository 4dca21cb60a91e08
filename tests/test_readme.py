"""Every `leantune` command in the README's ```bash blocks runs as written (issue 11), and its output is checked
where the answer is known. The README is parsed at test time, so a new example is tested the day it is written.

The only additions, in ADDITIONS, bound the slow commands: a 2-step limit for finetune (no exact-match evaluation,
2 validation batches, no sample), 16 new tokens for generate and no compiling (the README's `--compile true` example
spent ~35 s compiling the default model's int4 step for 16 tokens; compiled int8 and int4 decoding are tested on tiny
models in tests/test_woq.py and tests/test_decode_compiled.py), 2 batches for evaluate. The commands run in order (later
ones use earlier outputs, e.g. out/finetune/lora/final) in a fresh working directory whose checkpoints/ holds the
default model (linked, so nothing re-imports) and where the data files the README names (--data.json_path,
--data.local_path: the user's own or already downloaded files) are written as small placeholders. No network is used.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from leantune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
PREFIXES = ("leantune ", ".venv/bin/leantune ")

ADDITIONS = {
    "finetune": ["--train.max_steps", "2", "--eval.exact_match", "false", "--eval.max_batches", "2",
                 "--eval.sample_new_tokens", "0"],
    "generate": ["--max_new_tokens", "16", "--compile", "false"],
    "evaluate": ["--max_batches", "2", "--exact_match", "false"],
}
"""Flags appended per command (a later flag wins in jsonargparse, e.g. over the README's --train.max_steps 1000)."""

EXPECTED = {
    'generate --prompt "What is the capital of France?"': "Paris",
    "estimate --model meta-llama/Llama-2-7b-hf --method lora --lora.r 8": "4,194,304",
    "estimate --model google/flan-t5-base --method lora --lora.r 32 --lora.alpha 32 --lora.dropout 0.05": "3,538,944",
    "data preview --data Demo": "train: 800 samples",
    "merge --adapter out/finetune/lora/final": "merged 1 adapter(s) into",
    "evaluate --adapter out/finetune/qlora/final --quantize bnb.nf4-dq": "validation loss",
    "export --adapter out/finetune/lora/final --format peft": "exported PEFT adapter",
    "export --adapter out/finetune/lora/final --format gguf --gguf_type q8_0": "exported GGUF",
}
"""README command (without the `leantune` prefix) -> text its output must contain, where the answer is known."""


def readme_commands(text: str | None = None) -> list[list[str]]:
    """argv of every `leantune ...` command in the README's ```bash blocks (also after `&&`), comments removed."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands, in_bash = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith(PREFIXES):
                commands.append(shlex.split(part, comments=True)[1:])
    return commands


def command_key(argv: list[str]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in argv)


def test_readme_commands_are_found():
    argvs = readme_commands()
    assert len(argvs) >= 10
    keys = {command_key(a) for a in argvs}
    assert set(EXPECTED) <= keys, f"EXPECTED names commands the README no longer has: {set(EXPECTED) - keys}"
    assert ["finetune", "lora"] in argvs  # the quick start, found after `bash scripts/setup.sh &&`


def test_readme_commands_parse(capsys):
    """Fast tier: every README command's flags exist and their values parse (no model is loaded)."""
    for argv in readme_commands():
        with pytest.raises(SystemExit) as e:
            main([*argv, "--print_config"])
        assert e.value.code in (0, None), f"leantune {command_key(argv)}: {capsys.readouterr().err}"
    capsys.readouterr()


PLACEHOLDER_FLAGS = ("--data.json_path", "--data.local_path")
"""Flags whose file the README assumes the user has: written as 64 {instruction, input, output} rows (the layout
of JSON and of the Alpaca release), as JSON Lines for .jsonl, else as one JSON list."""


def write_placeholders(argv: list[str], root: Path) -> list[Path]:
    written = []
    for flag, value in zip(argv, argv[1:]):
        path = root / value
        if flag in PLACEHOLDER_FLAGS and not path.exists():
            rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(64)]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if path.suffix == ".jsonl"
                            else json.dumps(rows))
            written.append(path)
    return written


@pytest.mark.slow
def test_every_readme_command_runs(default_checkpoint, tmp_path, monkeypatch, capsys):
    from leantune.download import DEFAULT_REPO_ID

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    link = tmp_path / "checkpoints" / DEFAULT_REPO_ID
    link.parent.mkdir(parents=True)
    link.symlink_to(default_checkpoint.resolve(), target_is_directory=True)
    (tmp_path / "examples").symlink_to(README.parent / "examples", target_is_directory=True)  # the sweep specs
    ran, times = [], []
    for argv in readme_commands():
        key = command_key(argv)
        full = [*argv, *ADDITIONS.get(argv[0], [])]
        write_placeholders(argv, tmp_path)
        t0 = time.perf_counter()
        try:
            main(full)
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        times.append(f"{time.perf_counter() - t0:6.1f} s  leantune {key}")
        assert code == 0, f"README command `leantune {key}` (run as `leantune {command_key(full)}`) exited " \
                          f"{code}:\n{err[-2000:]}"
        if key in EXPECTED:
            assert EXPECTED[key] in out + err, f"`leantune {key}` printed:\n{out[-2000:]}\n{err[-1000:]}"
        ran.append(key)
    with capsys.disabled():
        print("\n" + "\n".join(times))
    assert set(EXPECTED) <= set(ran)
    assert (tmp_path / "out" / "finetune" / "lora" / "final" / "leantune.json").is_file()
