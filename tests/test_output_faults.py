"""Output folders never leak and fail in one line (issue 23, item 6): every write path is driven into a fault by
injection (a full disk, a mount point's EBUSY, EXDEV, EACCES, Ctrl-C) and must leave no temporary behind, keep the
previous output intact, and end in one `error:` line naming the folder; two writers of one --out_dir cannot both
run (the output's lock)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors
import torch

from leantune.checkpoint import io
from leantune.checkpoint.io import (
    NoSpaceError,
    OutputBusyError,
    OutputPathError,
    atomic_dir,
    atomic_write_bytes,
    lock_path,
    output_lock,
    save_safetensors,
)
from leantune.cli import main

KIND = "merged-model"


def write(folder, payload=b"new", fail=None):
    with atomic_dir(folder, kind=KIND) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(payload)
        if fail is not None:
            raise fail
    return folder


def litter(parent):
    """Hidden temporaries (.x.tmp-*, .x.old-*) or lock files left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def fail_rename_of(target, err):
    """os.replace that raises `err` when its source or destination is `target` (else renames)."""
    real = os.replace

    def replace(src, dst):
        if str(target) in (str(src), str(dst)):
            raise OSError(err, os.strerror(err), str(src))
        return real(src, dst)
    return replace


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EXDEV])
def test_an_existing_out_dir_that_cannot_be_renamed_is_refused_with_nothing_left(err, tmp_path, monkeypatch):
    """The issue's case: --out_dir is a mount point (a container volume): the old code left the 517 MB temporary."""
    out = write(tmp_path / "merged", b"old")
    monkeypatch.setattr(io.os, "replace", fail_rename_of(out, err))
    with pytest.raises(OutputPathError) as e:
        write(out, b"new")
    assert str(out) in str(e.value) and "\n" not in str(e.value) and "--out_dir" in str(e.value)
    assert litter(tmp_path) == [] and (out / "model.safetensors").read_bytes() == b"old"


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(io.os.path, "ismount", lambda p: str(p) == str(out))
    with pytest.raises(OutputPathError, match="is a mount point.*pass a folder inside it"):
        write(out)
    assert litter(tmp_path) == [] and list(out.iterdir()) == []


def test_a_new_folder_whose_rename_fails_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    monkeypatch.setattr(io.os, "replace", fail_rename_of(out, errno.EXDEV))
    with pytest.raises(OutputPathError, match="another file system"):
        write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                                               "StorageFull, message: \"No space left on device\" })"),
                                   PermissionError(errno.EACCES, "Permission denied"), KeyboardInterrupt()])
def test_a_fault_inside_the_write_removes_the_temporary(fault, tmp_path):
    out = write(tmp_path / "merged", b"old")
    expected = NoSpaceError if isinstance(fault, OSError | safetensors.SafetensorError) and not isinstance(
        fault, PermissionError) else type(fault)
    with pytest.raises(expected) as e:
        write(out, b"new", fail=fault)
    if expected is NoSpaceError:  # named after the output folder, not the hidden temporary
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
        assert str(out) in e.value.strerror and "no space left" in e.value.strerror and ".tmp-" not in e.value.strerror
    assert litter(tmp_path) == [] and (out / "model.safetensors").read_bytes() == b"old"


def test_ctrl_c_between_the_two_renames_restores_the_old_folder(tmp_path, monkeypatch):
    out = write(tmp_path / "merged", b"old")
    real = os.replace

    def replace(src, dst):
        if str(dst) == str(out) and ".tmp-" in str(src):  # the new folder's rename: the old one is already aside
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write(out, b"new")
    monkeypatch.setattr(io.os, "replace", real)
    assert litter(tmp_path) == [] and (out / "model.safetensors").read_bytes() == b"old"


def test_the_old_folder_is_removed_even_when_its_removal_is_interrupted(tmp_path, monkeypatch):
    out = write(tmp_path / "merged", b"old")
    real = io.shutil.rmtree
    calls = []

    def rmtree(path, ignore_errors=False):
        calls.append(path)
        real(path, ignore_errors=ignore_errors)
        if len(calls) == 1:
            raise KeyboardInterrupt  # after the swap, while the old folder goes
    monkeypatch.setattr(io.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        write(out, b"new")
    assert litter(tmp_path) == [] and (out / "model.safetensors").read_bytes() == b"new"


@pytest.mark.parametrize("writer", ["bytes", "safetensors"])
def test_a_full_disk_on_a_single_file_names_its_folder(writer, tmp_path, monkeypatch):
    target = tmp_path / "out" / ("a.json" if writer == "bytes" else "w.safetensors")
    if writer == "bytes":
        monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        call = lambda: atomic_write_bytes(target, b"{}")  # noqa: E731
    else:
        def full(*a, **k):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        monkeypatch.setattr(io.safetensors.torch, "save_file", full)
        call = lambda: save_safetensors({"x": torch.zeros(2)}, target)  # noqa: E731
    with pytest.raises(NoSpaceError) as e:
        call()
    assert e.value.filename == str(target.parent)
    assert os.listdir(target.parent) == []


def test_the_lock_refuses_a_second_writer_and_goes_away(tmp_path):
    out = tmp_path / "merged"
    with output_lock(out):
        assert lock_path(out).is_file()
        with pytest.raises(OutputBusyError, match="being written by another running leantune process"), \
                output_lock(out):
            pass
    assert litter(tmp_path) == []
    with output_lock(out):  # free again
        pass


# ---- the commands, end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.methods import apply_method, build_manifest, save_checkpoint
    from leantune.peft.lora import LoRAArgs
    from leantune.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("adapter") / "final"
    model = load_hf_checkpoint(tiny_checkpoint, dtype=torch.float32)
    args = LoRAArgs(r=2)
    trainable = apply_method(model, "lora", args)
    manifest = build_manifest("lora", args, tiny_checkpoint, Tokenizer(tiny_checkpoint), "template", "32-true",
                              model=model)
    out.mkdir()
    save_checkpoint(out, model, "lora", trainable, manifest, tiny_checkpoint)
    return out


def one_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def merge_argv(adapter, ckpt, out):
    return ["merge", "--adapter", str(adapter), "--checkpoint_dir", str(ckpt), "--out_dir", str(out)]


def test_merge_on_a_full_disk_is_one_line_and_leaves_nothing(adapter, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The issue's 32-line traceback: now one line naming the folder."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.safetensors.torch, "save_file", full)
    out = tmp_path / "merged"
    line = one_error(capsys, merge_argv(adapter, tiny_checkpoint, out))
    assert "no space left" in line and str(out) in line
    assert os.listdir(tmp_path) == []


def test_merge_into_a_mount_point_is_one_line_and_leaves_nothing(adapter, tiny_checkpoint, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(io.os.path, "ismount", lambda p: str(p) == str(out))
    line = one_error(capsys, merge_argv(adapter, tiny_checkpoint, out))
    assert "mount point" in line and str(out) in line
    assert os.listdir(tmp_path) == ["volume"] and os.listdir(out) == []


def test_a_full_disk_in_an_export_is_one_line(adapter, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """gguf writes its own temporary file; closing it on a full disk fails again, and it must still go."""
    import gguf

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "m.gguf"
    line = one_error(capsys, ["export", "--adapter", str(adapter), "--checkpoint_dir", str(tiny_checkpoint),
                              "--format", "gguf", "--out_dir", str(out)])
    assert "no space left" in line and str(tmp_path) in line
    assert os.listdir(tmp_path) == []


HOLD = textwrap.dedent("""
    import sys, time
    from leantune.checkpoint.io import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("command", ["merge", "export", "download"])
def test_a_second_writer_of_one_out_dir_is_refused(command, adapter, tiny_checkpoint, tmp_path, capsys):
    """Two concurrent merges into one --out_dir both exited 0, one result silently replacing the other: another
    process holding the output (as the first merge does while it writes) now refuses the second in one line."""
    out = tmp_path / ("checkpoints" if command == "download" else "merged")
    target = out / tiny_checkpoint.name if command == "download" else out
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = {"merge": merge_argv(adapter, tiny_checkpoint, out),
                "export": ["export", "--adapter", str(adapter), "--checkpoint_dir", str(tiny_checkpoint), "--format",
                           "peft", "--out_dir", str(out)],
                "download": ["download", str(tiny_checkpoint), "--checkpoint_dir", str(out)]}[command]
        line = one_error(capsys, argv)
        assert "being written by another running leantune process" in line and str(target) in line
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    main(argv)  # the holder gone, the same command goes through
    assert target.is_dir() and not [p for p in target.parent.iterdir() if p.name.startswith(".")]


HOLD_RUN = textwrap.dedent("""
    import sys, time
    from leantune.checkpoint.io import lock_file
    lock_file(sys.argv[1])
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("writer", ["merge", "run"])
def test_upload_refuses_a_folder_another_process_is_writing(writer, adapter, tmp_path, capsys):
    """A merge or export still writing the folder, or a live run that will replace its final/: reading it could mix
    old and new files. The same locks held by this process (a run finished in a notebook) do not count."""
    argv = ["upload", str(adapter), "--repo_id", "me/x", "--dry_run", "true"]
    script, lock = (HOLD, adapter) if writer == "merge" else (HOLD_RUN, adapter.parent / io.RUN_LOCK)
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error(capsys, argv)
        assert "being written by another running leantune process" in line and str(adapter) in line
    finally:
        holder.kill()
        holder.wait()
    held = io.lock_file(adapter.parent / io.RUN_LOCK)  # this process's own run lock
    try:
        main(argv)  # nobody else writing: the dry run goes through
    finally:
        io._release(held)
        (adapter.parent / io.RUN_LOCK).unlink()
    assert "would upload:" in capsys.readouterr().out


def test_a_killed_writers_temporaries_go_with_the_next_writer(adapter, tiny_checkpoint, tmp_path, capsys):
    """SIGKILL cannot be caught: a merge killed mid-write leaves its hidden temporary (the 517 MB of the issue). The
    next writer of that output holds its lock, so the temporary is a dead writer's and is removed; a previous output
    moved aside between the two renames comes back."""
    out = tmp_path / "merged"
    (tmp_path / ".merged.tmp-0123abcd").mkdir()
    (tmp_path / ".merged.tmp-0123abcd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.tmp-0123abcd").mkdir()  # another output's: not this writer's business
    main(merge_argv(adapter, tiny_checkpoint, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-0123abcd", "merged"]
    old = write(tmp_path / "restored", b"old")
    os.rename(old, tmp_path / ".restored.old-0123abcd")
    with output_lock(tmp_path / "restored"):
        assert (tmp_path / "restored" / "model.safetensors").read_bytes() == b"old"
