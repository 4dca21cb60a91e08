"""Output folders: leantune replaces only its own previous output of the same kind (and only with --overwrite);
anything else in the way is refused with one clear error naming the path, before any heavy work."""

from __future__ import annotations

import os

import pytest

from leantune.checkpoint import io
from leantune.checkpoint.io import (
    HF_MODEL_FILES,
    OUTPUT_MARKER,
    OutputExistsError,
    OutputPathError,
    atomic_dir,
    claim_output,
    claim_output_file,
    read_output_marker,
    write_output_marker,
)

KIND = "merged-model"


def write_model(folder, kind=KIND, weights=b"new"):
    """What a saver does: an HF-like folder through atomic_dir, marked with its kind."""
    with atomic_dir(folder, kind=kind) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(weights)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tokenizer.json").write_text("{}")
    return folder


def test_new_path_and_empty_folder_are_fine(tmp_path):
    claim_output(tmp_path / "a" / "b" / "out", KIND)
    (tmp_path / "empty" / "nested").mkdir(parents=True)  # empty sub-folders hold nothing to lose
    claim_output(tmp_path / "empty", KIND)
    claim_output(tmp_path / "empty", KIND, overwrite=True)


def test_the_issue_case_a_folder_with_foreign_files_is_refused_even_with_overwrite(tmp_path):
    precious = tmp_path / "out" / "precious"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError) as e:
            claim_output(precious, KIND, overwrite=overwrite)
        assert str(precious / "notes.txt") in str(e.value) and "Pick another --out_dir" in str(e.value)
    with pytest.raises(OutputExistsError), atomic_dir(precious, kind=KIND) as tmp:  # the saver refuses too
        (tmp / "model.safetensors").write_bytes(b"x")
    assert (precious / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(precious.parent)) == ["precious"]  # no temporary litter


def test_a_training_run_folder_is_not_replaced(tmp_path):
    run = tmp_path / "run"
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "lit_model.safetensors").write_bytes(b"w")
    (run / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(OutputExistsError, match="leantune did not write it"):
        claim_output(run, KIND, overwrite=True)


def test_own_output_of_the_same_kind_needs_overwrite(tmp_path):
    out = write_model(tmp_path / "merged", weights=b"old")
    assert read_output_marker(out) == {"kind": KIND, "files": ["config.json", "model.safetensors",
                                                               "sub/tokenizer.json"]}
    with pytest.raises(OutputExistsError) as e:
        claim_output(out, KIND)
    assert str(e.value) == (f"{out} already holds a {KIND} leantune wrote earlier: nothing was written. Pass "
                            "--overwrite true to replace it, or pick another --out_dir.")
    claim_output(out, KIND, overwrite=True)
    write_model(out, weights=b"new")
    assert (out / "model.safetensors").read_bytes() == b"new"
    (out / "sub" / "tokenizer.json").unlink()  # a file leantune wrote and the user removed: still its folder
    claim_output(out, KIND, overwrite=True)


def test_own_output_with_an_added_file_is_refused(tmp_path):
    out = write_model(tmp_path / "merged")
    (out / "sub" / "my_notes.md").write_text("mine")
    with pytest.raises(OutputExistsError) as e:
        claim_output(out, KIND, overwrite=True)
    assert str(out / "sub" / "my_notes.md") in str(e.value) and "even with --overwrite" in str(e.value)


def test_another_kind_of_leantune_output_is_refused(tmp_path):
    out = write_model(tmp_path / "peft", kind="peft-adapter")
    with pytest.raises(OutputExistsError, match=f"holds leantune's peft-adapter output, not a {KIND}"):
        claim_output(out, KIND, overwrite=True)
    (out / OUTPUT_MARKER).write_text("not json")
    with pytest.raises(OutputExistsError, match="unknown"):
        claim_output(out, KIND, overwrite=True)


def test_a_nested_output_of_another_kind_is_never_adopted(tmp_path):
    """An export saved inside a checkpoint (out/finetune/lora/final/export-peft) belongs to neither."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "lit_model.safetensors").write_bytes(b"w")
    write_model(final / "export-peft", kind="peft-adapter")
    write_output_marker(final, "checkpoint")
    assert read_output_marker(final)["files"] == ["lit_model.safetensors"]
    with pytest.raises(OutputExistsError, match="export-peft"):
        claim_output(final, "checkpoint", overwrite=True)


def test_a_file_or_symlink_in_the_way(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(OutputExistsError) as e:
        claim_output(tmp_path / "model.bin", KIND, overwrite=True)
    assert str(e.value) == f"{tmp_path / 'model.bin'} is a file, not a folder: nothing was written. Pick another --out_dir."
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputExistsError, match="is a symbolic link"):
        claim_output(tmp_path / "link", KIND, overwrite=True)


def test_a_file_where_a_parent_folder_should_be(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputPathError) as e:
        claim_output(tmp_path / "out" / "merged" / "x", KIND)
    assert str(e.value) == (f"cannot create {tmp_path / 'out' / 'merged' / 'x'}: {tmp_path / 'out'} is a file, not "
                            "a folder. Pick another --out_dir.")


def test_an_unwritable_parent_or_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(io.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(OutputPathError) as e:
        claim_output(locked / "new" / "merged", KIND)
    assert str(e.value) == (f"cannot create {locked / 'new' / 'merged'}: no permission to write in {locked}. "
                            "Pick another --out_dir.")
    with pytest.raises(OutputPathError, match=f"cannot write to {locked}: permission denied"):
        claim_output(locked, KIND)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="no permission to write in"):
            claim_output(locked / "merged", KIND)
    finally:
        locked.chmod(0o700)


def test_legacy_unmarked_folder_only_when_the_caller_says_so(tmp_path):
    old = tmp_path / "merged"
    old.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
        (old / name).write_text("{}")
    with pytest.raises(OutputExistsError, match="leantune did not write it"):
        claim_output(old, KIND, overwrite=True)  # without legacy_files a model folder could be the user's own
    with pytest.raises(OutputExistsError, match="--overwrite true"):
        claim_output(old, KIND, legacy_files=HF_MODEL_FILES)
    claim_output(old, KIND, overwrite=True, legacy_files=HF_MODEL_FILES)
    (old / "README.md").write_text("mine")
    with pytest.raises(OutputExistsError, match="README.md"):
        claim_output(old, KIND, overwrite=True, legacy_files=HF_MODEL_FILES)


def test_errors_are_value_errors_for_the_cli():
    assert issubclass(OutputExistsError, ValueError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(OutputPathError, ValueError)


def test_atomic_dir_without_kind_is_unchanged(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert os.listdir(tmp_path / "ckpt") == ["a.bin"]  # no marker unless a kind is given
    assert read_output_marker(tmp_path / "ckpt") is None


def test_a_single_output_file(tmp_path):
    gguf = tmp_path / "out" / "model.gguf"
    claim_output_file(gguf, magic=b"GGUF")  # new: fine, the folder is made later
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF\x03rest")
    with pytest.raises(OutputExistsError, match="--overwrite true"):
        claim_output_file(gguf, magic=b"GGUF")
    claim_output_file(gguf, overwrite=True, magic=b"GGUF")
    gguf.write_bytes(b"my own notes")
    with pytest.raises(OutputExistsError, match="is not a GGUF file"):
        claim_output_file(gguf, overwrite=True, magic=b"GGUF")
    with pytest.raises(OutputExistsError, match="is a folder, not a file"):
        claim_output_file(gguf.parent, overwrite=True)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        claim_output_file(gguf / "x.gguf")
