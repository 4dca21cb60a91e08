"""`leantune data preview`: rendered samples with trained-on spans marked, and length statistics."""

from __future__ import annotations

from data_support import FIXTURES, StubTokenizer

from leantune.commands.data import preview as preview_command
from leantune.data import JSON, Demo
from leantune.data.errors import Skips
from leantune.data.preview import render_sample
from leantune.data.prompts import PromptStyle
from leantune.data.sft import Example, tokenize_example


def test_render_sample_marks_supervised_spans():
    tok = StubTokenizer(use_bos=False, eos_ids=[2, 4])
    record = {"instruction": "Hi", "input": "", "output": "Yo"}
    sample = tokenize_example(Example(record, "x", 1, 0), PromptStyle.from_name("chatml"), tok, 2048, Skips())
    assert render_sample(sample, tok) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Yo<|im_end|>]]"
    assert "\033[32mYo<|im_end|>\033[0m" in render_sample(sample, tok, color=True)


def test_preview_demo_on_default_model(default_checkpoint, capsys):
    stats = preview_command(Demo(num_train=30, num_val=5), default_checkpoint, num_samples=2)
    out = capsys.readouterr().out
    assert "prompt style: template" in out and out.count("--- sample") == 2
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out
    assert "train: 30 samples" in out and "p95" in out and "supervised" in out
    assert stats["train"]["count"] == 30 and stats["train"]["over_max_seq_length"] == 0


def test_preview_reports_over_long_samples_instead_of_failing(default_checkpoint, capsys):
    data = JSON(json_path=FIXTURES / "bad" / "too_long.jsonl", val_split_fraction=0.0, truncation="error")
    stats = preview_command(data, default_checkpoint, num_samples=1, max_seq_length=37, prompt_style="chatml")
    out = capsys.readouterr().out
    assert stats["train"]["over_max_seq_length"] == 1 and stats["train"]["truncated"] == 0  # measured, not cut
    assert "too_long.jsonl:2" in out and "--data.truncation error" in out
