"""Atomic file and folder writes, used for every checkpoint, manifest and config the project writes, and the
policy for output folders (`claim_output`).

A crash, Ctrl-C or full disk mid-write must never leave a half-written file where a good one was: we write to
a temporary sibling (same directory, so the final `os.replace` is an atomic rename), fsync, then rename.
A folder is only ever replaced when it is leantune's own previous output of the same kind: every output folder
carries a small marker file (`.leantune-output`) naming its kind and the files leantune wrote there.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
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
        with named_disk_errors(path.parent):
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
        with named_disk_errors(path.parent):
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


def check_regular_file(path: str | Path) -> Path:
    """`path`, when it is a regular file to read; else one error naming it. A FIFO would block the reader forever
    (opening one waits for a writer) and a device never ends, so neither reaches a loader."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    what = "a folder" if path.is_dir() else "a FIFO, device or socket"
    raise ValueError(f"{path}: is not a regular file ({what}); the folder holding it is damaged: write or copy it "
                     "again")


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file (memory-mapped on CPU, so untouched tensors cost no RAM)."""
    check_regular_file(path)
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except safetensors.SafetensorError as e:  # truncated or not safetensors at all: name the file, not a trace
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it is truncated or damaged") from e


@contextmanager
def atomic_dir(final_dir: str | Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; when the block succeeds it replaces `final_dir` in one rename.

    On any failure (an exception in the block, a full disk, a refused rename, Ctrl-C) the temporary directory is
    deleted and an existing `final_dir` is left untouched. An existing `final_dir` is moved aside only once the new
    one is complete, and deleted after the swap. A `final_dir` that cannot be renamed (a mount point: EBUSY, or
    another file system: EXDEV) is refused with one error naming it (`OutputPathError`), nothing left behind.
    With `kind` (an output folder the user named, e.g. "merged-model"), the new folder gets the output marker, and
    an existing `final_dir` that is not leantune's own output of that kind is refused before anything is written
    (the command should already have called `claim_output`, which also asks for --overwrite).
    """
    final_dir = Path(final_dir)
    if kind is not None:
        claim_output(final_dir, kind, overwrite=True)
    _refuse_mount_point(final_dir)
    with named_disk_errors(final_dir):
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(final_dir, "tmp")
        os.mkdir(tmp, 0o777)
    backup: Path | None = None
    try:
        with named_disk_errors(final_dir):
            yield tmp
            if kind is not None:
                write_output_marker(tmp, kind)
            for root, _, files in os.walk(tmp):
                for name in files:
                    p = Path(root) / name
                    if p.is_file() and not p.is_symlink():
                        _fsync_file(p)
                _fsync_dir(Path(root))
            if final_dir.exists() or final_dir.is_symlink():
                backup = _tmp_sibling(final_dir, "old")
                _rename(final_dir, backup, final_dir)
            try:
                _rename(tmp, final_dir, final_dir)
            except BaseException:
                if backup is not None:
                    try:
                        os.replace(backup, final_dir)
                    finally:  # restored, or (restore refused too) kept under its hidden name: never deleted
                        backup = None
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:  # after a swap the old folder goes, even when Ctrl-C lands here
        if backup is not None:
            _remove(backup)
    _fsync_dir(final_dir.parent)


class NoSpaceError(OSError):
    """The disk (or quota) holding an output is full; the message names the folder and the way out.

    An OSError with errno ENOSPC, so code that looks at errno still sees a full disk; the CLI prints it as one line.
    """


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def no_space(where: Path) -> NoSpaceError:
    err = NoSpaceError(errno.ENOSPC, f"no space left on the device holding {where} (nothing was replaced there): "
                                     "free some space, or write to another disk (e.g. another --out_dir)")
    err.filename = str(where)
    return err


def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, also as safetensors' Rust error text (`StorageFull` / `os error 28`)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)
    return isinstance(e, safetensors.SafetensorError) and ("StorageFull" in text or "os error 28" in text
                                                          or "QuotaExceeded" in text)


@contextmanager
def named_disk_errors(where: Path) -> Iterator[None]:
    """A full disk inside the block becomes NoSpaceError naming `where` (the bare one names no file at all)."""
    try:
        yield
    except (OSError, safetensors.SafetensorError) as e:  # an inner NoSpaceError is renamed: the outer path counts
        if is_disk_full(e):
            raise no_space(where) from e
        raise


@contextmanager
def disk_full_names(where: Path) -> Iterator[None]:
    """A full disk inside the block that names no file (a log line or a CSV row flushed) becomes NoSpaceError naming
    `where`, the output the block writes; one that names its file keeps it."""
    try:
        yield
    except (OSError, safetensors.SafetensorError) as e:
        if is_disk_full(e) and not isinstance(e, NoSpaceError) and not getattr(e, "filename", None):
            raise no_space(where) from e
        raise


def _rename(src: Path, dst: Path, final_dir: Path) -> None:
    """os.replace, with a mount point or a cross-device folder refused in one line instead of a bare EBUSY."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.EXDEV):
            raise _not_renamable(final_dir, e) from e
        raise


def _not_renamable(final_dir: Path, e: OSError) -> OutputPathError:
    why = "a mount point" if e.errno == errno.EBUSY else "on another file system than its parent folder"
    return OutputPathError(f"{final_dir} is {why}, which leantune cannot replace ({e.strerror}): leantune writes a "
                           "folder beside it and renames it into place. Nothing was written; pass a folder inside it "
                           f"instead, e.g. --out_dir {final_dir / 'out'}")


def _refuse_mount_point(final_dir: Path) -> None:
    """Checked before anything is written: a rename onto or off a mount point always fails (EBUSY)."""
    if final_dir.is_dir() and not final_dir.is_symlink() and os.path.ismount(final_dir):
        raise _not_renamable(final_dir, OSError(errno.EBUSY, os.strerror(errno.EBUSY)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- output folders: never replace anything but leantune's own previous output of the same kind ---------------
OUTPUT_MARKER = ".leantune-output"
HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                  "spiece.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                  "chat_template.jinja", "chat_template.json")
"""The files of an HF model folder written by `save_hf_checkpoint` / `save_t5_checkpoint` (T5's tokenizer is
`spiece.model`), for `claim_output(legacy_files=...)`."""
PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files of a PEFT adapter folder written by the PEFT export (for `claim_output(legacy_files=...)`)."""


class OutputPathError(ValueError):
    """An output path leantune will not write to; the message names the path and what to do instead.

    A ValueError, so the CLI reports it as one line with exit status 2.
    """


class OutputExistsError(OutputPathError, FileExistsError):
    """The output path holds something leantune must not replace (or was not told to: --overwrite)."""


def claim_output(path: str | Path, kind: str, overwrite: bool = False, *, legacy_files: Iterable[str] = ()) -> None:
    """Check, before any heavy work, that a command may write its `kind` of output at `path`; raise if not.

    Allowed: a path that does not exist (its parent is created later), or an empty folder. A folder holding
    leantune's previous output of the same `kind` (its marker says so and every file in it is one leantune listed
    there) is allowed only with `overwrite=True`. Refused even with `overwrite`: a file or symlink at `path`, a
    folder with any file leantune did not write (named in the message), a folder holding another kind of leantune
    output, and a path whose nearest existing parent is a file or is not writable.
    `legacy_files`: fnmatch patterns (relative paths; `*` also crosses `/`) that make an unmarked folder count as
    leantune's output of this kind when every file matches; pass them only for a path leantune itself chose (a
    default --out_dir), since a user's own model folder has the same files.
    """
    path = Path(path)
    _check_parent(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        what = "a symbolic link" if path.is_symlink() else "a file"
        raise OutputExistsError(f"{path} is {what}, not a folder: nothing was written. Pick another --out_dir.")
    if not path.exists():
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write to {path}: permission denied. Pick another --out_dir.")
    files = _files_under(path)
    if not files:
        return
    marker = read_output_marker(path)
    if marker is None and not (legacy_files and all(_matches(f, legacy_files) for f in files)):
        raise OutputExistsError(f"{path} is not empty and leantune did not write it ({path / files[0]} is not "
                                "leantune's): nothing was written and nothing there is replaced. Pick another "
                                "--out_dir, or empty that folder.")
    if marker is not None:
        if marker.get("kind") != kind:
            raise OutputExistsError(f"{path} holds leantune's {marker.get('kind') or 'unknown'} output, not a {kind}: "
                                    "nothing was written and it is not replaced. Pick another --out_dir.")
        owned = set(marker.get("files") or ()) | {OUTPUT_MARKER}
        foreign = [f for f in files if f not in owned]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputExistsError(f"{path} holds files leantune did not write there ({path / foreign[0]}{more}): "
                                    "nothing was written and nothing is replaced, even with --overwrite. Pick another "
                                    "--out_dir, or move those files away.")
    if not overwrite:
        raise OutputExistsError(f"{path} already holds a {kind} leantune wrote earlier: nothing was written. Pass "
                                "--overwrite true to replace it, or pick another --out_dir.")


def claim_output_file(path: str | Path, overwrite: bool = False, *, magic: bytes | None = None) -> None:
    """The same check for a single output file the user named (e.g. `--out_dir model.gguf`): a new path is fine
    (its nearest existing parent must be a writable folder); an existing file is replaced only with `overwrite`,
    and never when `magic` is given and the file does not start with it (then it is not that kind of output)."""
    path = Path(path)
    _check_parent(path)
    if path.is_dir() or path.is_symlink():
        what = "a folder" if path.is_dir() and not path.is_symlink() else "a symbolic link"
        raise OutputExistsError(f"{path} is {what}, not a file: nothing was written. Pick another --out_dir.")
    if not path.exists():
        return
    if magic is not None:
        with open(path, "rb") as fh:
            if fh.read(len(magic)) != magic:
                raise OutputExistsError(f"{path} exists and is not a {magic.decode(errors='replace')} file: nothing "
                                        "was written and it is not replaced. Pick another --out_dir.")
    if not overwrite:
        raise OutputExistsError(f"{path} already exists: nothing was written. Pass --overwrite true to replace it, "
                                "or pick another --out_dir.")


def write_output_marker(folder: str | Path, kind: str, files: Iterable[str] | None = None) -> Path:
    """Mark `folder` as leantune's `kind` output, listing the files leantune wrote (default: every file there now,
    except inside sub-folders that carry their own marker, e.g. an export saved inside a checkpoint)."""
    folder = Path(folder)
    listed = sorted(set(files)) if files is not None else _files_under(folder, skip_marked=True)
    return write_json(folder / OUTPUT_MARKER, {"kind": kind, "files": [f for f in listed if f != OUTPUT_MARKER]})


def read_output_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of an output folder ({"kind", "files"}), {} when it is unreadable, None when there is none."""
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_parent(path: Path) -> None:
    """The nearest existing parent of `path` must be a writable folder (one clear error instead of a late trace)."""
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {path}: {parent} is a file, not a folder. Pick another --out_dir.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {path}: no permission to write in {parent}. Pick another --out_dir.")


def _files_under(folder: Path, skip_marked: bool = False) -> list[str]:
    """Relative posix paths of everything under `folder` that is not a directory (symlinks included, not followed)."""
    out = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if skip_marked and here != folder and (here / OUTPUT_MARKER).is_file():
            dirs.clear()
            continue
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links)
        out += [(here / name).relative_to(folder).as_posix() for name in [*files, *links]]
    return sorted(out)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---- one writer per output: an exclusive lock the kernel drops when the process dies ------------------------------
class OutputBusyError(OutputPathError):
    """Another live leantune process is writing the same output (it holds the output's lock)."""


def lock_file(lock: str | Path, *, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on `lock` (created if missing), or None when another open file holds it and
    `wait` is false. flock is released by the kernel when the process dies, SIGKILL included; -1 where there is no
    flock (Windows: one writer per output is then the user's to keep)."""
    try:
        import fcntl
    except ImportError:
        return -1
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    st = os.fstat(fd)
    _HELD[st.st_dev, st.st_ino] = fd
    return fd


_HELD: dict[tuple[int, int], int] = {}
"""The locks this process holds ((device, inode) -> fd): what this process writes is not another's."""


def _release(fd: int) -> None:
    st = os.fstat(fd)
    _HELD.pop((st.st_dev, st.st_ino), None)
    os.close(fd)


def lock_path(output: str | Path) -> Path:
    """The lock of an output folder or file: a hidden sibling, since the output itself is replaced by a rename."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


@contextmanager
def output_lock(output: str | Path, *, wait: bool = False) -> Iterator[None]:
    """Hold `output`'s lock for the block; a second writer of the same output is refused with OutputBusyError (or,
    with `wait`, waits for the first). The lock file is removed on the way out."""
    output = Path(output)
    lock = lock_path(output)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create {output}: {e.filename or lock.parent} is not a writable folder "
                              f"({e.strerror}). Pick another --out_dir.") from e
    for _ in range(10):
        fd = lock_file(lock, wait=wait)
        if fd is None:
            raise OutputBusyError(f"{output} is being written by another running leantune process: wait for it to "
                                  "finish, stop it, or pick another --out_dir")
        if fd == -1 or _same_file(fd, lock):
            break
        _release(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    else:
        raise OutputBusyError(f"{output}: could not take its lock {lock}; try again")
    try:
        clean_stale_siblings(output)
        yield
    finally:
        if fd != -1:
            lock.unlink(missing_ok=True)  # while still holding it: a waiter then sees another inode and retries
            _release(fd)


def clean_stale_siblings(output: Path) -> list[str]:
    """Remove the hidden temporaries a killed writer of `output` left beside it (`.name.tmp-*`, the new folder or file
    it never renamed into place; `.name.old-*`, the previous one, renamed back when `output` is missing). Called with
    the output's lock held, so no live writer owns them. Returns what was removed or restored."""
    stale = re.compile(rf"\.{re.escape(output.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    done = []
    for path in sorted(output.parent.iterdir()) if output.parent.is_dir() else []:
        m = stale.fullmatch(path.name)
        if m is None:
            continue
        if m[1] == "old" and not output.exists() and not output.is_symlink():
            os.replace(path, output)  # killed between atomic_dir's two renames: the previous output is complete
        else:
            _remove(path)
        done.append(path.name)
    return done


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


@contextmanager
def claimed_output(path: str | Path, kind: str, overwrite: bool = False, *,
                   legacy_files: Iterable[str] = ()) -> Iterator[Path]:
    """`claim_output`, then hold the output's lock while the block writes it (claimed again under the lock, so two
    commands started together cannot both pass the check): two merges into one --out_dir -> the second is refused."""
    path = Path(path)
    claim_output(path, kind, overwrite, legacy_files=legacy_files)
    with output_lock(path):
        claim_output(path, kind, overwrite, legacy_files=legacy_files)
        yield path


@contextmanager
def claimed_output_file(path: str | Path, overwrite: bool = False, *, magic: bytes | None = None) -> Iterator[Path]:
    """`claim_output_file` with the output's lock held for the block (see `claimed_output`)."""
    path = Path(path)
    claim_output_file(path, overwrite, magic=magic)
    with output_lock(path):
        claim_output_file(path, overwrite, magic=magic)
        yield path


def held_elsewhere(lock: str | Path) -> bool:
    """Whether another live process holds the flock on an existing `lock` (none is created): it is writing what the
    lock guards. A lock this process holds (a run finished in it, e.g. in a notebook) is not another's."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return False
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in _HELD:
        os.close(fd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this call took
    return False


RUN_LOCK = ".leantune.lock"
"""The lock a training run holds inside its --out_dir for its whole life (leantune.train.run_dir)."""


def check_not_being_written(folder: str | Path) -> None:
    """Refuse to read `folder` while a live leantune process writes it: a merge or export into it (its output lock),
    or, for a run's `final/`, the run that will replace it (the run folder's lock). Reading it then could mix files
    of the old and the new folder."""
    folder = Path(folder)
    writing = held_elsewhere(lock_path(folder)) or (folder.name == "final" and held_elsewhere(folder.parent / RUN_LOCK))
    if writing:
        raise OutputBusyError(f"{folder} is being written by another running leantune process: wait for it to "
                              "finish, then run this again")
