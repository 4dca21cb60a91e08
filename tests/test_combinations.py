"""The combination matrix, generated from the tables: every (model kind x method x flag) either trains through the
CLI on a tiny model or is refused before any model loads with one `error:` line. No case may end in a traceback.

Kinds come from `leantune.models.kinds.KINDS`, methods from the method table (variants such as qlora included), flags
from FLAGS below: a new kind, method or flag joins the matrix by being added there. The fast tier runs every method
plain and a sample of methods with each cheap flag; the slow tier (CI runs it too) runs the rest, with the compiled
and the two-process cases, which cost tens of seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from method_cases import tiny_args
from t5_support import samsum_rows, tiny_t5_folder

import leantune.models.kinds as kinds
from leantune.cli import main
from leantune.methods import METHODS

FLAGS: dict[str, list[str]] = {
    "plain": [],
    "activation_checkpointing": ["--train.activation_checkpointing", "true"],
    "bf16-mixed": ["--precision", "bf16-mixed"],
    "nf4": ["--quantize", "bnb.nf4"],
    "resume": [],  # one step, then --resume auto for a second (see run_case)
    "compile": ["--train.compile", "true"],
    "2 processes": ["--devices", "2", "--train.global_batch_size", "4"],  # 2 rows on each of 2 processes
}
EXPENSIVE = {"compile", "2 processes"}  # tens of seconds a case: slow tier only
FAST_SAMPLE = {"lora", "qlora", "adalora", "prefix_tuning", "adapter_v2", "full"}  # every cheap flag in the fast tier
KIND_NAMES = [k.name for k in kinds.KINDS]


def cases():
    for kind in KIND_NAMES:
        for method in sorted(METHODS):
            for flag in FLAGS:
                fast = flag == "plain" or (flag not in EXPENSIVE and method in FAST_SAMPLE)
                marks = () if fast else (pytest.mark.slow,)
                yield pytest.param(kind, method, flag, id=f"{kind}-{method}-{flag}", marks=marks)


@pytest.fixture(scope="module")
def worlds(tiny_checkpoint, json_data, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """{kind name: (tiny model folder, its data flags)}: a 2-layer Llama with the default tokenizer on instruction
    data, and a tiny flan-t5-style T5 on samsum-format dialogues."""
    root = tmp_path_factory.mktemp("kinds")
    rows = samsum_rows(24)
    (root / "samsum.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    t5 = tiny_t5_folder(root / "t5", rows)
    return {
        "decoder": (tiny_checkpoint, ["--data", "JSON", "--data.json_path", str(json_data)]),
        "encoder-decoder": (t5, ["--data", "Summarization", "--data.json_path", str(root / "samsum.jsonl")]),
    }


def method_flags(method: str) -> list[str]:
    """The tiny models' method arguments (LLaMA-Adapter's start layer) and a short AdaLoRA schedule."""
    args = tiny_args(method)
    flags = [f"--{METHODS[method].flag}.start_layer", str(args.start_layer)] if hasattr(args, "start_layer") else []
    if method == "adalora":
        flags += ["--adalora.tinit", "0", "--adalora.tfinal", "0", "--adalora.total_step", "4"]
    return flags


def argv(method: str, folder: Path, data: list[str], out: Path, steps: int, extra: list[str]) -> list[str]:
    return ["finetune", method, "--checkpoint_dir", str(folder), *data, "--out_dir", str(out),
            "--train.max_steps", str(steps), "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
            "--train.max_seq_length", "128", "--train.save_interval", "1", "--eval.interval", "100",
            "--eval.initial_validation", "false", "--eval.max_batches", "1", "--eval.exact_match", "false",
            "--eval.sample_new_tokens", "0", "--threads", "2", *method_flags(method), *extra]


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The model folders whose weights started loading, by either kind's loader."""
    seen: list[str] = []
    for name in ("load_hf_checkpoint", "load_t5_checkpoint"):
        real = getattr(kinds, name)

        def spy(folder, *a, _real=real, **k):
            seen.append(str(folder))
            return _real(folder, *a, **k)

        monkeypatch.setattr(kinds, name, spy)
    return seen


def run(args: list[str], capsys) -> tuple[int | str, str, str]:
    """(exit code or the exception that escaped, stdout, stderr) of `leantune args`, run in-process."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # noqa: BLE001 -- a traceback is the failure being looked for
        code = f"{type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind,method,flag", list(cases()))
def test_each_combination_trains_or_is_refused_in_one_line(kind, method, flag, worlds, loads, tmp_path, capsys,
                                                           monkeypatch):
    folder, data = worlds[kind]
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # --devices re-runs `leantune` under torchrun from here
    code, stdout, stderr = run(argv(method, folder, data, out, 1, FLAGS[flag]), capsys)
    if code == 0 and flag == "resume":  # continue the finished one-step run for a second step from its checkpoint
        code, stdout, stderr = run(argv(method, folder, data, out, 2, ["--resume", "auto"]), capsys)
    where = f"{kind} x {method} x {flag}: exit {code}\nstdout: {stdout[-800:]}\nstderr: {stderr[-1500:]}"
    assert "Traceback" not in stderr and not isinstance(code, str), where
    if code == 0:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == (2 if flag == "resume" else 1), where
        return
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, where
    assert not loads, f"{where}\nrefused only after loading {loads}"
    assert not out.exists() or not any(out.glob("step-*")), where


# The rows of the issue that first filed the matrix: each ended in a traceback or was refused, and now trains.
CLOSED_GAPS = [("encoder-decoder", "adalora", "plain"), ("encoder-decoder", "lora", "activation_checkpointing"),
               ("encoder-decoder", "qlora", "plain"), ("encoder-decoder", "lora", "nf4")]
# What a kind lacks is refused, naming the kind, before anything loads.
REFUSED = [("encoder-decoder", "adapter", "plain"), ("encoder-decoder", "adapter_v2", "plain"),
           ("encoder-decoder", "prefix_tuning", "plain")]


@pytest.mark.parametrize("kind,method,flag", CLOSED_GAPS + REFUSED)
def test_the_filed_rows_train_or_are_refused_for_their_reason(kind, method, flag, worlds, loads, tmp_path, capsys):
    folder, data = worlds[kind]
    code, _, stderr = run(argv(method, folder, data, tmp_path / "run", 1, FLAGS[flag]), capsys)
    if (kind, method, flag) in REFUSED:
        assert code == 2 and f"not available for {kind} models" in stderr and not loads, stderr
    else:
        assert code == 0, stderr[-1500:]
