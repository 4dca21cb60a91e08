"""Atomic writes: an interrupted write leaves the previous file or folder intact and no temporary litter."""

import json
import os
import stat

import pytest
import safetensors.torch
import torch

from leantune.checkpoint import io
from leantune.checkpoint.io import atomic_dir, atomic_write_bytes, load_safetensors, save_safetensors, write_json


def _entries(path):
    return sorted(p.name for p in path.iterdir())


def test_write_json_roundtrip_and_overwrite(tmp_path):
    p = tmp_path / "sub" / "a.json"
    write_json(p, {"x": 1, "name": "naïve ✓"})
    write_json(p, {"x": 2, "name": "naïve ✓"})
    text = p.read_text(encoding="utf-8")
    assert json.loads(text) == {"x": 2, "name": "naïve ✓"}
    assert text.startswith('{\n  "x": 2') and "naïve ✓" in text  # indent=2, non-ASCII kept
    assert _entries(p.parent) == ["a.json"]


def test_atomic_write_respects_umask(tmp_path):
    p = atomic_write_bytes(tmp_path / "f.bin", b"abc")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    write_json(p, {"v": "old"})

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(p, {"v": "new"})
    assert json.loads(p.read_text()) == {"v": "old"}
    assert _entries(tmp_path) == ["a.json"]


def test_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(4, 3).t()}
    p = save_safetensors(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    loaded = load_safetensors(p)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # safetensors alone would leave 0o600


def test_interrupted_safetensors_save_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.ones(4)}, p)
    real = safetensors.torch.save_file

    def partial_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # simulate a torn write, then the crash
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", partial_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"w": torch.zeros(4)}, p)
    assert torch.equal(load_safetensors(p)["w"], torch.ones(4))
    assert _entries(tmp_path) == ["m.safetensors"]


def test_atomic_dir_creates_and_replaces(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final and not final.exists()
        write_json(tmp / "config.json", {"v": 1})
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    assert json.loads((final / "config.json").read_text()) == {"v": 1}
    with atomic_dir(final) as tmp:
        write_json(tmp / "config.json", {"v": 2})
        assert json.loads((final / "config.json").read_text()) == {"v": 1}  # old one intact until the swap
    assert _entries(final) == ["config.json"]
    assert json.loads((final / "config.json").read_text()) == {"v": 2}
    assert _entries(tmp_path) == ["ckpt"]  # no temp or backup folders left


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_exception_keeps_previous(tmp_path, exc):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        save_safetensors({"w": torch.ones(2)}, tmp / "model.safetensors")
    with pytest.raises(exc):
        with atomic_dir(final) as tmp:
            save_safetensors({"w": torch.zeros(2)}, tmp / "model.safetensors")
            raise exc("interrupted")
    assert torch.equal(load_safetensors(final / "model.safetensors")["w"], torch.ones(2))
    assert _entries(tmp_path) == ["ckpt"]


def test_atomic_dir_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "new"):
            raise ValueError
    assert _entries(tmp_path) == []


def test_atomic_dir_swap_failure_restores_previous(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        write_json(tmp / "config.json", {"v": 1})
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder in fails after the old one was moved aside
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text('{"v": 2}')
    assert json.loads((final / "config.json").read_text()) == {"v": 1}
    assert _entries(tmp_path) == ["ckpt"]
