"""DPO on 2 ranks (gloo, FSDP2) x micro batch 2 pairs == 1 process x 4 pairs: the same losses, rewards and LoRA
tensors, the reference being the adapter switched off inside the sharded model (see tests/test_distributed.py for
the setup and the tolerance)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distributed import free_port

from leantune.data.preference import PairSample, collate_pairs
from leantune.methods import apply_method, get_method, load_trainable, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.base import adapter_off, switchable_layers
from leantune.peft.lora import LoRAArgs
from leantune.train.distributed import init_from_env, shutdown
from leantune.train.loop import EvalArgs, TrainArgs, fit
from leantune.train.optim import OptimizerArgs
from leantune.train.preference import PreferenceArgs, PreferenceObjective, adapter_off_reference

V = 61


class TinyPairs:
    """Deterministic pairs of unequal lengths; batches of `batch` pairs in a fixed shuffled order per epoch."""

    def __init__(self, batch: int, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.pairs = []
        for i in range(n):
            p, c, r = (torch.randint(3, V, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(3))
            self.pairs.append(PairSample([1, *p], c, r, i, index=i))
        self.batch = batch

    def train_dataloader(self, epoch: int = 0):
        order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [collate_pairs([self.pairs[k] for k in order[s:s + self.batch]], 0)
                for s in range(0, len(order) - self.batch + 1, self.batch)]

    def val_dataloader(self):
        return [collate_pairs(self.pairs[s:s + 4], 0, "val") for s in range(0, 8, 4)]


def train(out_dir, parallel=None, mbs=4, gbs=8):
    world = parallel.world_size if parallel else 1
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    names = apply_method(model, "lora", LoRAArgs(r=4, dropout=0.0, targets="all"))
    layers = switchable_layers(model, names)
    objective = PreferenceObjective("dpo", PreferenceArgs(beta=0.5), adapter_off_reference(lambda m: adapter_off(layers)))
    fit(model, names, TinyPairs(mbs * world), out_dir,
        lambda path: save_checkpoint(path, model, "lora", names, {"method": "lora"}, checkpoint_dir=None),
        lambda p: load_trainable(model, "lora", p),
        TrainArgs(micro_batch_size=mbs, global_batch_size=gbs, max_steps=4, warmup_steps=1),
        EvalArgs(sample_new_tokens=0, max_batches=2), OptimizerArgs(lr=1e-2), parallel=parallel,
        method=get_method("lora"), objective=objective)


def _rank(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    parallel = init_from_env(timeout_s=60)
    try:
        train(out_dir, parallel=parallel, mbs=2)
    finally:
        shutdown(parallel)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)


def logged(out_dir):
    with open(Path(out_dir) / "metrics.csv") as f:
        return [{k: float(r[k]) for k in ("loss", "reward_accuracy", "reward_margin", "logps_chosen")}
                for r in csv.DictReader(f) if r["loss"]]


def test_two_ranks_of_2_pairs_equal_one_process_of_4_under_dpo(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tmp_path / "one")
    finally:
        torch.set_num_threads(before)
    mp.start_processes(_rank, args=(2, free_port(), tmp_path / "two"), nprocs=2, start_method="fork")
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert one[-1]["reward_margin"] != 0.0  # the policy moved away from the reference
    wa, wb = (load_file(tmp_path / d / "final" / "adapter.safetensors") for d in ("one", "two"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=2e-5, msg=k)
