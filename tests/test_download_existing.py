"""`leantune download` onto an existing `checkpoints/<name>` never claims a write that did not happen: importing a
local file or folder there is refused (exit 2) unless --force true; the complete default model is reused and says so."""

from __future__ import annotations

import pytest
import torch

from leantune.checkpoint.io import save_safetensors
from leantune.commands.download import download as download_command
from leantune.download import DEFAULT_REPO_ID, download


@pytest.fixture
def fake_convert(monkeypatch):
    """GGUF conversion that writes a recognisable folder (the conversion itself is tested in test_gguf_import)."""
    calls = []

    def convert(gguf_path, out_dir, dtype=torch.float32):
        calls.append(gguf_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json"):
            (out_dir / name).write_text("{}")
        (out_dir / "model.safetensors").write_bytes(gguf_path.read_bytes())
        return out_dir

    monkeypatch.setattr("leantune.checkpoint.gguf.gguf_to_hf", convert)
    return calls


def test_gguf_onto_an_existing_folder_is_refused_and_keeps_the_old_model(tmp_path, fake_convert, capsys):
    first, second = tmp_path / "a" / "model-f16.gguf", tmp_path / "b" / "model-f16.gguf"  # every export's name
    for path, body in ((first, b"first"), (second, b"second")):
        path.parent.mkdir()
        path.write_bytes(body)
    ck = tmp_path / "checkpoints"
    out = download_command(str(first), ck)
    assert "Saved" in capsys.readouterr().out
    with pytest.raises(FileExistsError) as e:
        download_command(str(second), ck)
    message = str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI maps ValueError to one line and exit 2
    assert str(out) in message and "--force true" in message and "nothing was written" in message
    assert "Saved" not in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == b"first" and fake_convert == [first]
    download_command(str(second), ck, force=True)
    assert (out / "model.safetensors").read_bytes() == b"second"
    assert "Saved" in capsys.readouterr().out


def test_cli_exit_code_and_message(tmp_path, fake_convert, capsys):
    from leantune.cli import main

    gguf = tmp_path / "model-f16.gguf"
    gguf.write_bytes(b"x")
    main(["download", str(gguf), "--checkpoint_dir", str(tmp_path / "ck")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["download", str(gguf), "--checkpoint_dir", str(tmp_path / "ck")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "Saved" not in captured.out
    assert f"{tmp_path / 'ck' / 'model-f16'} already exists" in captured.err and "--force true" in captured.err


def test_hf_folder_onto_an_existing_folder_is_refused(tmp_path):
    src = tmp_path / "merged"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    save_safetensors({"w": torch.ones(2)}, src / "model.safetensors")
    out = download(str(src), tmp_path / "ck")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        download(str(src), tmp_path / "ck")
    assert (out / "notes.txt").read_text() == "keep"
    assert download(str(out), tmp_path / "ck") == out  # a folder onto itself stays a no-op


def test_complete_default_model_is_reused_and_says_so(tmp_path, fake_convert, capsys, monkeypatch):
    bundled = tmp_path / "bundled.gguf"
    bundled.write_bytes(b"default")
    monkeypatch.setattr("leantune.checkpoint.gguf.default_gguf_path", lambda: bundled)
    out = download_command("smollm2-135m-instruct", tmp_path / "ck")
    assert out == tmp_path / "ck" / DEFAULT_REPO_ID and "Saved" in capsys.readouterr().out
    assert download_command("smollm2-135m-instruct", tmp_path / "ck") == out
    said = capsys.readouterr().out
    assert f"already imported at {out}" in said and "Saved" not in said
    assert fake_convert == [bundled]
    (out / "model.safetensors").unlink()  # a partial import of our own folder is redone, not refused
    assert download("smollm2-135m-instruct", tmp_path / "ck") == out and len(fake_convert) == 2
