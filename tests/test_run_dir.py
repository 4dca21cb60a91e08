"""One output folder holds one run: checked before any loading, never mixed, never left with stale temporaries."""

import multiprocessing
import os

import pytest

from leantune.data import JSON
from leantune.finetune import finetune
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs


def run(ckpt, data_path, out_dir, **kw):
    return finetune("lora", checkpoint_dir=ckpt, out_dir=out_dir, data=JSON(json_path=data_path),
                    train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2, max_seq_length=128,
                                    warmup_steps=1, save_interval=1),
                    eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                    optimizer=OptimizerArgs(lr=1e-2), threads=2, **kw)


def test_new_run_into_a_run_folder_is_refused_before_loading(tiny_checkpoint, json_data, tmp_path):
    """Issue 11 item 3: a second run into a run's folder is refused (the model path is bogus: nothing loads)."""
    run(tiny_checkpoint, json_data, tmp_path)
    with pytest.raises(ValueError, match=r"holds a finished run \(final/, 2 steps\): pass --resume auto to continue "
                                         r"it, --overwrite true to replace it, or another --out_dir"):
        run(tmp_path / "no-such-model", json_data, tmp_path)


def test_overwrite_replaces_only_leantune_outputs(tiny_checkpoint, json_data, tmp_path):
    run(tiny_checkpoint, json_data, tmp_path / "run")
    (tmp_path / "run" / "step-000007").mkdir()  # an extra step of the old run: must go with it
    report = run(tiny_checkpoint, json_data, tmp_path / "run", overwrite=True)
    assert report["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000001"]


def test_folder_with_other_files_is_refused_and_kept(tmp_path):
    from leantune.train.run_dir import prepare_run_dir

    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "final").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds files leantune did not write \(notes.txt\)"):
            prepare_run_dir(tmp_path, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "final").is_dir()


def test_out_dir_that_is_a_file_fails_first(tiny_checkpoint, json_data, tmp_path):
    """Issue 11 item 6: a file in the way fails before data and model load (the model path is bogus)."""
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match=r"taken is a file"):
        run(tmp_path / "no-such-model", json_data, tmp_path / "taken")
    with pytest.raises(ValueError, match=r"taken is a file"):
        run(tmp_path / "no-such-model", json_data, tmp_path / "taken" / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_first(json_data, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"is not writable"):
        run(tmp_path / "no-such-model", json_data, parent / "out")


def test_stale_temporaries_are_cleaned_on_resume(tiny_checkpoint, json_data, tmp_path):
    """Issue 11 item 8: a kill mid-write left `.step-N.tmp-*` (and, between atomic_dir's renames, `.final.old-*`
    with no final/): the next start removes the first and restores the second."""
    run(tiny_checkpoint, json_data, tmp_path)
    stale = tmp_path / ".step-000003.tmp-0123abcd"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"half")
    os.replace(tmp_path / "final", tmp_path / ".final.old-89abcdef")
    from leantune.train.run_dir import prepare_run_dir

    prepare_run_dir(tmp_path, resume="auto")
    assert not stale.exists() and (tmp_path / "final" / "adapter.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _hold(out_dir, ready):
    from leantune.train.run_dir import prepare_run_dir

    prepare_run_dir(out_dir)
    ready.set()
    import time

    time.sleep(60)


def test_a_live_run_keeps_its_folder(tmp_path):
    """The lock that proves stale temporaries dead also refuses a second live run into the same folder."""
    from leantune.train.run_dir import prepare_run_dir

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold, args=(tmp_path / "out", ready))
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ValueError, match="in use by another running leantune process"):
            prepare_run_dir(tmp_path / "out")
    finally:
        child.kill()
        child.join()
    assert prepare_run_dir(tmp_path / "out") == tmp_path / "out"  # the kernel released the dead run's lock
