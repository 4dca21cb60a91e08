"""`leantune chat` driven by scripted stdin on a tiny random Llama with the default model's chat template: multi-line
input, /save, /reset, and dropping the oldest turns (with a notice) when the history outgrows the context window."""

import io
import json

import pytest

from leantune.commands.chat import chat, fit_history, read_message
from leantune.tokenizer import Tokenizer


def run_chat(monkeypatch, capsys, script: str, **kw) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    chat(**{"temperature": 0.0, "max_new_tokens": 4, "threads": 1, **kw})
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_read_message_joins_backslash_lines_and_blocks(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('one \\\ntwo\n"""\n  a\n\nb \\\n"""\nlast\n"""\nopen'))
    assert read_message() == "one \ntwo"
    assert read_message() == "  a\n\nb \\"  # a block keeps its lines verbatim, backslashes included
    assert read_message() == "last"
    assert read_message() == "open"  # an unclosed block at end of input
    assert read_message() is None


def test_multiline_message_and_save(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    out_file = tmp_path / "sub" / "talk.json"
    script = f'first line \\\nsecond line\n"""\nx = 1\ny = 2\n"""\n/save {out_file}\n/exit\n'
    out, err = run_chat(monkeypatch, capsys, script, checkpoint_dir=tiny_checkpoint, system="Be brief.")
    saved = json.loads(out_file.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[1]["content"] == "first line \nsecond line" and saved[3]["content"] == "x = 1\ny = 2"
    assert saved[0]["content"] == "Be brief."
    assert saved[2]["content"] and saved[2]["content"] in out  # what was streamed is what was kept
    assert f"saved 5 messages to {out_file}" in err


def test_save_without_a_name_is_refused_and_reset_clears(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    f = tmp_path / "after_reset.json"
    out, err = run_chat(monkeypatch, capsys, f"hello\n/save\n/reset\n/save {f}\n", checkpoint_dir=tiny_checkpoint)
    assert "not saved: /save needs a file name" in err and "history cleared" in err
    assert json.loads(f.read_text()) == {"messages": []}


def test_old_turns_are_dropped_with_a_notice(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    tok = Tokenizer(tiny_checkpoint)
    long = " ".join(["apple"] * 60)  # ~60 tokens; the tiny model's context is 256
    f = tmp_path / "c.json"
    script = "".join(f"{i} {long}\n" for i in range(5)) + f"/save {f}\n"
    out, err = run_chat(monkeypatch, capsys, script, checkpoint_dir=tiny_checkpoint, system="S", max_new_tokens=30)
    assert "oldest turn(s) to fit the 256-token context" in err
    saved = json.loads(f.read_text())["messages"]
    assert saved[0] == {"role": "system", "content": "S"}  # the system message always stays
    users = [m["content"] for m in saved if m["role"] == "user"]
    assert users[-1].startswith("4 ") and not users[0].startswith("0 ")  # newest kept, oldest gone
    ids, dropped = fit_history(tok, list(saved), 256 - 30)
    assert dropped == 0 and len(ids) <= 256 - 30  # what was kept fits beside the answer's budget


def test_a_message_longer_than_the_context_is_not_sent(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    f = tmp_path / "c.json"
    script = " ".join(["word"] * 400) + f"\nhi\n/save {f}\n"
    out, err = run_chat(monkeypatch, capsys, script, checkpoint_dir=tiny_checkpoint)
    assert "longer than the model's 256-token context; not sent" in err
    assert [m["content"] for m in json.loads(f.read_text())["messages"] if m["role"] == "user"] == ["hi"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_chat_runs_on_a_weight_only_base(tiny_checkpoint, monkeypatch, capsys, mode, tmp_path):
    f = tmp_path / "c.json"
    out, err = run_chat(monkeypatch, capsys, f"hi\n/save {f}\n", checkpoint_dir=tiny_checkpoint, quantize=mode)
    assert [m["role"] for m in json.loads(f.read_text())["messages"]] == ["user", "assistant"]
