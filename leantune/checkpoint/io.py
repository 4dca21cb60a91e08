"""Atomic file and folder writes, used for every checkpoint, manifest and config the project writes.

A crash, Ctrl-C or full disk mid-write must never leave a half-written file where a good one was: we write to
a temporary sibling (same directory, so the final `os.replace` is an atomic rename), fsync, then rename.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        # os.open with 0o666 lets the umask decide permissions (mkstemp would force 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as indented UTF-8 JSON (non-ASCII kept readable, as transformers writes it)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (tensors are made contiguous; shared storage is the caller's to untie)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        # Reserve the name with umask-respecting permissions; safetensors itself would leave the file 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file (memory-mapped on CPU, so untouched tensors cost no RAM)."""
    return safetensors.torch.load_file(str(path), device=str(device))


@contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; when the block succeeds it replaces `final_dir` in one rename.

    On any exception the temporary directory is deleted and an existing `final_dir` is left untouched. An
    existing `final_dir` is moved aside only once the new one is complete, and deleted after the swap.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final_dir, "tmp")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                p = Path(root) / name
                if p.is_file() and not p.is_symlink():
                    _fsync_file(p)
            _fsync_dir(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.exists() or final_dir.is_symlink():
        backup = _tmp_sibling(final_dir, "old")
        os.replace(final_dir, backup)
        try:
            os.replace(tmp, final_dir)
        except BaseException:
            os.replace(backup, final_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)
    else:
        os.replace(tmp, final_dir)
    _fsync_dir(final_dir.parent)
