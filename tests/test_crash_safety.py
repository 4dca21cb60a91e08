"""SIGKILL at random points never costs more than the steps since the last checkpoint (issue 11 acceptance).

A training run (lora with dropout, adapter_v2, full on a tiny random Llama) is forked from this process and killed
with SIGKILL either at a random time into training or in the middle of a checkpoint write (made reliable by
pausing the child after the weights went into the hidden temporary folder and before the training state is
written: the child signals the parent, which kills it there). Afterwards every visible checkpoint must be
complete, and `--resume auto` must end with the same final weight bytes as an uninterrupted run.

Why fork: the child starts in milliseconds with everything imported (a fresh interpreter costs seconds each).
Everything trains on one thread (the child sets it; libgomp is not fork-safe with a thread team), so the
uninterrupted reference, the killed child and the resumed run compute the same bits.
"""

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from leantune.data import JSON
from leantune.finetune import finetune
from leantune.peft.adapter_v2 import AdapterV2Args
from leantune.peft.lora import LoRAArgs
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs
from leantune.train.state import STATE_FILE

METHOD_ARGS = {"lora": LoRAArgs(r=4, dropout=0.1), "adapter_v2": AdapterV2Args(start_layer=1), "full": None}
STEPS, SAVE_EVERY = 4, 1


def train(method, ckpt, data_path, out_dir, resume=None):
    return finetune(method, checkpoint_dir=ckpt, out_dir=out_dir, data=JSON(json_path=data_path),
                    train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=STEPS, max_seq_length=64,
                                    warmup_steps=1, save_interval=SAVE_EVERY),
                    eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                    optimizer=OptimizerArgs(lr=1e-2), method_args=METHOD_ARGS[method], resume=resume, threads=1)


def _child(conn, method, ckpt, data_path, out_dir, pause_at_save):
    """The run to kill: reports its first step, and with pause_at_save=k stops inside the k-th checkpoint write."""
    import leantune.train.loop as loop

    torch.set_num_threads(1)
    real_lr, real_state = loop.lr_at, loop.save_training_state
    saves = 0

    def lr_at(*args, **kwargs):  # called once per optimizer step, just before it
        conn.send("step")
        return real_lr(*args, **kwargs)

    def state(*args, **kwargs):
        nonlocal saves
        saves += 1
        if saves == pause_at_save:
            conn.send("in-checkpoint")  # weights are in the temporary folder; the state is not
            time.sleep(120)
        return real_state(*args, **kwargs)

    loop.lr_at, loop.save_training_state = lr_at, state
    train(method, ckpt, data_path, out_dir)
    conn.send("done")


def final_bytes(out_dir):
    folder = out_dir / "final"
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*.safetensors"))}


def assert_only_complete_checkpoints(out_dir):
    for d in out_dir.iterdir():
        if d.name.startswith("step-") or d.name == "final":
            assert (d / STATE_FILE).is_file(), d
            torch.load(d / STATE_FILE, weights_only=True)
            assert any(d.rglob("*.safetensors")), d


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["lora", "adapter_v2", "full"])
def test_sigkill_anywhere_then_resume_gives_the_same_weights(method, tiny_checkpoint, json_data, tmp_path, one_thread):
    train(method, tiny_checkpoint, json_data, tmp_path / "straight")
    expected = final_bytes(tmp_path / "straight")
    ctx = multiprocessing.get_context("fork")
    for seed in range(3):
        rng = random.Random(f"{method}-{seed}")
        out_dir = tmp_path / f"killed-{seed}"
        # seed 0: inside a checkpoint write (which one is drawn); others: a random moment after the first step
        pause_at = rng.randint(1, STEPS // SAVE_EVERY) if seed == 0 else None
        parent, child_end = ctx.Pipe()
        child = ctx.Process(target=_child, args=(child_end, method, tiny_checkpoint, json_data, out_dir, pause_at))
        child.start()
        try:
            assert parent.poll(60), "the child never started training"
            wanted = "in-checkpoint" if pause_at else "step"
            while (msg := parent.recv()) not in (wanted, "done"):
                pass
            if msg == "step":
                time.sleep(rng.uniform(0, 1.5))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        if pause_at:
            assert [p for p in out_dir.iterdir() if ".tmp-" in p.name], "the kill did not land inside a write"
        assert_only_complete_checkpoints(out_dir)
        train(method, tiny_checkpoint, json_data, out_dir, resume="auto")
        assert final_bytes(out_dir) == expected, (seed, pause_at)
        assert not [p.name for p in out_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
