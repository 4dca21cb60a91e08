"""Every user-caused failure is one truthful line, and a first run reads right (issue 23, items 7-9): no claim of an
intact checkpoint when none was written, batch arithmetic refused before torchrun with the product named, run.json
recording the micro batch the user typed (so the same flags resume on one process), a FIFO or device as the data
file named as such, the chat template's sandbox refusal and a full disk as one line, the main job's sample with its
prompt and expected answer, chat saying when an answer was cut, and an lm-eval install hint that works."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import in_process, losses, on_ranks

from leantune.cli import main
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.distributed import check_batch_sizes, describe_failure, resume_note
from leantune.train.loop import run_configuration
from leantune.train.optim import OptimizerArgs
from leantune.train.run_config import batch_position, differences
from leantune.train.state import STATE_FILE


def one_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- item 8: a killed rank, the batch arithmetic, run.json ---------------------------------------------------------
def failure(**ranks):
    return SimpleNamespace(failures={int(r[4:]): SimpleNamespace(exitcode=code, timestamp=i)
                                     for i, (r, code) in enumerate(ranks.items())})


def test_a_killed_rank_says_no_checkpoint_was_written_when_none_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("step,loss\n")
    text = describe_failure(failure(rank1=-signal.SIGKILL, rank0=-signal.SIGTERM), out)
    assert text.startswith("rank 1 was killed by SIGKILL; the launcher stopped the other rank(s) (0).")
    assert f"No checkpoint was written yet in {out}" in text and "intact" not in text
    step = out / "step-000004"
    step.mkdir()
    (step / STATE_FILE).write_bytes(b"x")
    text = describe_failure(failure(rank1=-signal.SIGKILL), out)
    assert f"The last complete checkpoint, {step}, is intact: continue with --resume auto." in text
    assert "No checkpoint" in resume_note(tmp_path / "never-made")


def test_batch_arithmetic_names_the_product():
    with pytest.raises(ValueError) as e:
        check_batch_sizes(2, 2, 2)
    assert str(e.value).startswith("--train.global_batch_size 2 is not a multiple of micro_batch_size 2 x 2 "
                                   "processes = 4: pass --train.global_batch_size 4")
    assert check_batch_sizes(2, 8, 2) == 2


def test_devices_batch_arithmetic_is_refused_before_torchrun_starts(tiny_checkpoint, json_data, tmp_path, monkeypatch,
                                                                    capsys):
    import leantune.commands.finetune as command

    def launch(*a, **k):
        raise AssertionError("torchrun was started")
    monkeypatch.setattr(command, "launch", launch)
    line = one_error(capsys, ["finetune", "lora", "--devices", "2", "--checkpoint_dir", str(tiny_checkpoint),
                              "--data", "JSON", "--data.json_path", str(json_data), "--out_dir", str(tmp_path / "o"),
                              "--train.micro_batch_size", "2", "--train.global_batch_size", "2"])
    assert "--train.global_batch_size 2 is not a multiple of micro_batch_size 2 x 2 processes = 4" in line
    assert "intact" not in line and not (tmp_path / "o").exists()


def test_run_json_records_the_micro_batch_the_user_typed():
    train = TrainArgs(micro_batch_size=2, global_batch_size=4)
    saved = run_configuration(None, train, EvalArgs(), OptimizerArgs(), "32-true", world_size=2)
    assert saved["train"]["micro_batch_size"] == 2 and saved["world_size"] == 2 and saved["batch_rows"] == 4
    one = run_configuration(None, train, EvalArgs(), OptimizerArgs(), "32-true", world_size=1)
    assert differences(saved, one) == []  # the same flags on one process: the same run
    assert batch_position(saved, 3, 2, 100) == 6  # 3 batches of 4 rows are 6 of 2
    assert batch_position(saved, 3, 4, 100) == 3 and batch_position(saved, 25, 2, 49) == 49  # a short last batch


def test_length_grouping_keeps_the_rows_per_batch():
    train = TrainArgs(micro_batch_size=2, global_batch_size=4)
    data = {"data": {"class": "JSON", "length_grouping": True}}
    saved = run_configuration(data, train, EvalArgs(), OptimizerArgs(), "32-true", world_size=2)
    one = run_configuration(data, train, EvalArgs(), OptimizerArgs(), "32-true", world_size=1)
    assert differences(saved, one) == ["--train.micro_batch_size 2 x 2 processes -> 2 x 1 process (with "
                                       "--data.length_grouping the rows per batch, micro batch x processes, must stay "
                                       "the same)"]


def test_two_ranks_of_micro_batch_2_resume_on_one_process_with_the_same_flags(tmp_path):
    """The issue's case end to end: refused before ('--train.micro_batch_size 4 -> 2', a value never typed); now the
    one process continues on the same samples (two micro batches per step), equal up to float rounding."""
    on_ranks(2, method="lora", out_dir=tmp_path / "straight", mbs=2, gbs=4, save_interval=2)
    (tmp_path / "one").mkdir()
    shutil.copytree(tmp_path / "straight" / "step-000002", tmp_path / "one" / "step-000002")
    in_process(method="lora", out_dir=tmp_path / "one", mbs=2, gbs=4, resume="auto")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "one")),
                               torch.tensor(losses(tmp_path / "straight")[2:]), rtol=1e-5, atol=0)


# ---- item 8: data files that are not files ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_as_the_data_file_is_named_as_such(kind, tiny_checkpoint, tmp_path, capsys):
    if kind == "fifo":
        path = tmp_path / "train.jsonl"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    line = one_error(capsys, ["data", "preview", "--checkpoint_dir", str(tiny_checkpoint), "--data", "JSON",
                              "--data.json_path", str(path)])
    assert f"{path}: is not a regular file (a FIFO, device or socket)" in line and "no such file" not in line


# ---- item 7: one line for the chat template's sandbox and a full disk --------------------------------------------
def test_a_chat_template_the_sandbox_refuses_is_one_line_naming_it(tiny_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "evil"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "chat_template.jinja").write_text("{{ messages.append({'role': 'x'}) }}{{ ''.__class__.__mro__ }}")
    line = one_error(capsys, ["generate", "--checkpoint_dir", str(ckpt), "--prompt", "hi", "--max_new_tokens", "1"])
    assert str(ckpt / "chat_template.jinja") in line and "sandbox" in line


def test_a_full_disk_anywhere_is_one_line_and_debug_shows_the_trace(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import leantune.commands.generate as generate

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
    monkeypatch.setattr(generate, "load_for_inference", full)
    line = one_error(capsys, ["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "hi"])
    assert "no space left" in line and str(tmp_path / "x.bin") in line
    with pytest.raises(OSError):
        main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "hi", "--debug"])


def test_value_error_subclasses_of_any_module_are_one_line(tiny_checkpoint, monkeypatch, capsys):
    """Other modules' errors (a tiny temperature, a refused pickle) reach the CLI as ValueError subclasses."""
    import leantune.commands.generate as generate

    class SomeModulesError(ValueError):
        pass

    def refuse(*a, **k):
        raise SomeModulesError("--temperature 1e-30: below the floor")
    monkeypatch.setattr(generate, "load_for_inference", refuse)
    assert one_error(capsys, ["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "hi"]) == (
        "error: --temperature 1e-30: below the floor")


# ---- item 9: the first run's words ---------------------------------------------------------------------------------
def test_the_main_job_shows_the_sample_prompt_expected_and_model_answer(tiny_checkpoint, tmp_path, capsys):
    from leantune.data import Demo
    from leantune.finetune import finetune

    data = Demo()
    finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "run", data=data,
             train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=1, max_seq_length=64),
             eval=EvalArgs(max_batches=1, sample_new_tokens=3, exact_match=False), threads=2)
    out = capsys.readouterr().out
    record = data.test_set()[0]
    for when in ("before training", "after training"):
        block = out[out.index(f"sample {when}"):].splitlines()[:4]
        assert block[1].startswith("  prompt:") and record["instruction"][:20] in block[1]
        assert block[2] == f"  expected: {record['output']!r}"
        assert block[3].startswith("  model:") and block[3].endswith(("(right)", "(wrong)"))


def test_chat_says_when_an_answer_stopped_at_max_new_tokens(tiny_checkpoint, monkeypatch, capsys):
    import io

    import leantune.commands.chat as chat

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    chat.chat(checkpoint_dir=tiny_checkpoint, temperature=0.0, max_new_tokens=3, threads=1)  # random: never ends
    assert "[the answer stopped at --max_new_tokens 3 and may be cut off; start chat with a larger " \
           "--max_new_tokens" in capsys.readouterr().err
    monkeypatch.setattr(chat, "stream_text", lambda *a, **k: ("done", 2, 0.0))  # ended by itself: no notice
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    chat.chat(checkpoint_dir=tiny_checkpoint, temperature=0.0, max_new_tokens=3, threads=1)
    assert "stopped at" not in capsys.readouterr().err


def test_a_full_disk_while_training_names_the_run_folder(tiny_checkpoint, json_data, tmp_path, monkeypatch, capsys):
    """A metrics row that cannot be flushed names no file of its own: the line names the run's --out_dir."""
    import leantune.train.metrics as metrics

    def full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(metrics.MetricsWriter, "write", full)
    out = tmp_path / "run"
    line = one_error(capsys, ["finetune", "lora", "--checkpoint_dir", str(tiny_checkpoint), "--data", "JSON",
                              "--data.json_path", str(json_data), "--out_dir", str(out), "--train.max_steps", "1",
                              "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
                              "--train.max_seq_length", "64", "--eval.exact_match", "false",
                              "--eval.sample_new_tokens", "0", "--eval.max_batches", "1"])
    assert line == (f"error: no space left on the device holding {out} (nothing was replaced there): free some space, "
                    "or write to another disk (e.g. another --out_dir)")
