"""Multi-process training (torchrun + FSDP2) on CPU with gloo: 2 ranks x micro batch 2 == 1 process x batch 4.

Ranks are forked from this process (everything is imported already; each sets one thread, as libgomp is not
fork-safe with a thread team) and meet over loopback on a free port. The tiny 2-layer GPT and TinyData of the loop
tests; dropout 0, so the two runs do the same arithmetic except for the order of the fp32 sums (each rank sums its
half of the gradient, then the reduce-scatter adds the halves; one process sums all rows in one matmul), and the
shape of the matmuls (2 rows per forward instead of 4). Measured differences are ~1e-7 relative on the losses and
~1e-6 on the weights after 4 AdamW steps; the tolerance is rtol 1e-5 / atol 1e-6 (Adam divides by sqrt(v), which
keeps relative errors of the gradients as they are, so they do not grow over 4 steps at this size).
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TinyData, V
from method_cases import EVERY_METHOD, tiny_args
from safetensors.torch import load_file

from leantune.data import JSON
from leantune.data.seq2seq import shift_right
from leantune.finetune import finetune
from leantune.methods import apply_method, get_method, load_trainable, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.quantize import quantize_model
from leantune.models.t5.model import T5, T5Config
from leantune.peft.adapter_v2 import AdapterV2Args
from leantune.peft.lora import LoRAArgs
from leantune.peft.lora_layers import DoRAArgs
from leantune.train import distributed
from leantune.train.distributed import (
    DCP_DIR,
    FSDPArgs,
    Parallel,
    check_fsdp_args,
    init_from_env,
    shard_batch,
    shutdown,
)
from leantune.train.loop import EvalArgs, TrainArgs, accumulation_steps, check_parallel_method, fit
from leantune.train.optim import OptimizerArgs
from leantune.train.state import STATE_FILE, find_latest_checkpoint

# no dropout (each rank draws its own masks, one process draws others): the runs differ only by float rounding
METHOD_ARGS = {**{m: tiny_args(m) for m in EVERY_METHOD}, "lora": LoRAArgs(r=4, dropout=0.0, targets="all"),
               "dora": DoRAArgs(r=4, dropout=0.0), "adapter_v2": AdapterV2Args(start_layer=1)}
RTOL, ATOL = 1e-5, 2e-5


def build(method, quantize=None, dropout=0.0):
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=64, n_layer=2, n_embd=64 if quantize else 32, n_head=4,
                       n_query_groups=2))
    if quantize:
        quantize_model(model, quantize, torch.float32)
    args = LoRAArgs(r=4, dropout=dropout, targets="all") if method == "lora" else METHOD_ARGS[method]
    names = apply_method(model, method, args)
    if method == "adapter_v2":  # zero-init gates: make the adapters matter from step 1
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("gating_factor"):
                    p.fill_(0.5)
    return model, names


def train(method, out_dir, parallel=None, mbs=4, gbs=8, steps=4, save_interval=None, resume=None, quantize=None,
          activation_checkpointing=False, dropout=0.0):
    """fit on TinyData: the loader gives global batches of mbs x world rows, each rank trains on its share."""
    world = parallel.world_size if parallel else 1
    model, names = build(method, quantize, dropout)
    if quantize and parallel:  # the 4-bit base stays whole on every rank: bitsandbytes' own parameter, its state
        packed = {n: (p, p.data.clone()) for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}

    def save_fn(path):
        save_checkpoint(path, model, method, names, {"method": method}, checkpoint_dir=None)

    summary = fit(model, names, TinyData(micro_batch_size=mbs * world), out_dir, save_fn,
                  lambda p: load_trainable(model, method, p),
                  TrainArgs(micro_batch_size=mbs, global_batch_size=gbs, max_steps=steps, warmup_steps=1,
                            save_interval=save_interval, activation_checkpointing=activation_checkpointing),
                  EvalArgs(sample_new_tokens=0, max_batches=2), OptimizerArgs(lr=1e-2), resume=resume,
                  parallel=parallel, method=get_method(method))
    if quantize and parallel:
        after = dict(model.named_parameters())
        for n, (p, data) in packed.items():
            assert after[n] is p and type(after[n]).__name__ == "Params4bit" and p.quant_state is not None, n
            assert torch.equal(p.data, data), n
    return summary


def _rank(rank, world, port, kwargs):
    torch.set_num_threads(1)
    # gloo ranks on the CPU on a GPU machine too: a forked child cannot use CUDA once the parent has, and a second
    # rank would find no GPU of its own on a 1-GPU machine (this process only: it exits after the run)
    torch.cuda.is_available = lambda: False
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    parallel = init_from_env(timeout_s=60)
    try:
        train(parallel=parallel, **kwargs)
    finally:
        shutdown(parallel)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_ranks(world, **kwargs):
    """train(**kwargs) on `world` forked ranks; an error on any rank fails here."""
    mp.start_processes(_rank, args=(world, free_port(), kwargs), nprocs=world, start_method="fork")


def in_process(**kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(**kwargs)
    finally:
        torch.set_num_threads(before)


def losses(out_dir):
    with open(Path(out_dir) / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def weights(folder):
    """Every tensor of the consolidated weights (adapter.safetensors, or the HF folder model/ of a full finetune)."""
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(Path(folder).rglob("*.safetensors"))
            if DCP_DIR not in f.parts for k, v in load_file(f).items()}


def assert_same_run(a, b, rtol=RTOL, atol=ATOL):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and la
    torch.testing.assert_close(torch.tensor(lb, dtype=torch.float64), torch.tensor(la, dtype=torch.float64),
                               rtol=rtol, atol=0)
    wa, wb = weights(Path(a) / "final"), weights(Path(b) / "final")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("method", ["lora", "adapter_v2", "full"])
def test_two_ranks_of_batch_2_equal_one_process_of_batch_4(method, tmp_path):
    """Per-step losses and final consolidated tensors (2 steps of accumulation 2: 16 samples per step)."""
    in_process(method=method, out_dir=tmp_path / "one", mbs=4, gbs=8)
    on_ranks(2, method=method, out_dir=tmp_path / "two", mbs=2, gbs=8)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    untouched, names = build(method)
    first = weights(tmp_path / "two" / "final")
    assert any(not torch.equal(v, dict(untouched.named_parameters()).get(k.split(":", 1)[1], v))
               for k, v in first.items()), "training changed nothing"


class FirstHalfUnsupervised(TinyData):
    """TinyData whose global batches have no supervised token in their first half of rows: on 2 ranks, rank 0's share
    skips the LM head's loss entirely."""

    def train_dataloader(self, epoch: int = 0):
        batches = super().train_dataloader(epoch)
        for b in batches:
            b["labels"][: len(b["labels"]) // 2] = -100
        return batches


def test_a_rank_without_supervised_tokens_joins_the_reduce_scatter_on_torch_without_unused_params(tmp_path,
                                                                                                   monkeypatch):
    """torch before 2.12 has no `set_reduce_scatter_unused_params`: the head (LoRA on it) must still get a gradient on
    a rank whose share has no supervised token, or the ranks reduce-scatter different tensors. Simulated here by
    removing the method (the forked ranks inherit the patch); the run equals one process."""
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.setattr(sys.modules[__name__], "TinyData", FirstHalfUnsupervised)
    monkeypatch.delattr(FSDPModule, "set_reduce_scatter_unused_params", raising=False)
    in_process(method="lora", out_dir=tmp_path / "one", mbs=4, gbs=8, steps=2)
    on_ranks(2, method="lora", out_dir=tmp_path / "two", mbs=2, gbs=8, steps=2)
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("case", [dict(method="lora", activation_checkpointing=True),
                                  dict(method="lora", quantize="bnb.nf4")], ids=["checkpointing", "qlora"])
def test_two_ranks_equal_one_process_with_activation_checkpointing_and_a_4_bit_base(case, tmp_path):
    """QLoRA: bitsandbytes' Params4bit keeps its packed bytes and quant_state whole on every rank (FSDP ignores
    it: frozen, no gradient to reduce); the LoRA tensors, norms, embedding and head are sharded."""
    in_process(out_dir=tmp_path / "one", mbs=4, gbs=8, **case)
    on_ranks(2, out_dir=tmp_path / "two", mbs=2, gbs=8, **case)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def max_difference(a, b) -> tuple[float, float]:
    """(largest relative loss difference, largest weight difference) between two runs."""
    la, lb = losses(a), losses(b)
    wa, wb = weights(Path(a) / "final"), weights(Path(b) / "final")
    assert len(la) == len(lb) and wa.keys() == wb.keys() and wa
    return max(abs(x - y) / abs(x) for x, y in zip(la, lb)), max(float((wa[k] - wb[k]).abs().max()) for k in wa)


OTHER_METHODS = [m for m in EVERY_METHOD if m not in ("lora", "adapter_v2", "full", "adalora")]


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_other_method_on_two_ranks_is_as_close_as_float_rounding_allows(method, tmp_path):
    """The rest of the table (AdaLoRA is refused, see below) for 2 steps. Yardstick: one process with micro batch 2
    instead of 4 (the same update, other summation order); 2 ranks must stay within 3x its difference (+1e-6). For
    prefix tuning that floor is ~5e-4 on the weights: Adam divides by sqrt(v), so rounding in gradients near 0
    becomes a visible step; the loss stays within 1e-5."""
    in_process(method=method, out_dir=tmp_path / "one", mbs=4, gbs=8, steps=2)
    in_process(method=method, out_dir=tmp_path / "floor", mbs=2, gbs=8, steps=2)
    on_ranks(2, method=method, out_dir=tmp_path / "two", mbs=2, gbs=8, steps=2)
    (floor_loss, floor_w), (loss, w) = max_difference(tmp_path / "one", tmp_path / "floor"), max_difference(
        tmp_path / "one", tmp_path / "two")
    assert loss <= 3 * floor_loss + 1e-6 and loss < RTOL, (loss, floor_loss)
    assert w <= 3 * floor_w + 1e-6, (w, floor_w)


def copy_checkpoint(src_run, step, dst_run):
    Path(dst_run).mkdir()
    shutil.copytree(Path(src_run) / f"step-{step:06d}", Path(dst_run) / f"step-{step:06d}")


def test_a_checkpoint_of_two_ranks_resumes_on_two_ranks_and_on_one(tmp_path):
    """4 steps on 2 ranks with a sharded checkpoint at step 2; resumed from it on 2 ranks the run continues bit for
    bit (same world size: every rank gets its own RNG streams back), on 1 process (micro batch 4) within the
    tolerance above."""
    on_ranks(2, method="lora", out_dir=tmp_path / "straight", mbs=2, gbs=4, save_interval=2)
    ckpt = tmp_path / "straight" / "step-000002"
    assert (ckpt / DCP_DIR / ".metadata").is_file() and (ckpt / STATE_FILE).is_file()
    assert not (ckpt / "adapter.safetensors").exists()  # consolidated weights only in final/
    assert (tmp_path / "straight" / "final" / "adapter.safetensors").is_file()
    for name in ("two", "one"):
        copy_checkpoint(tmp_path / "straight", 2, tmp_path / name)
    on_ranks(2, method="lora", out_dir=tmp_path / "two", mbs=2, gbs=4, resume="auto")
    in_process(method="lora", out_dir=tmp_path / "one", mbs=4, gbs=4, resume="auto")
    assert losses(tmp_path / "two") == losses(tmp_path / "straight")[2:]
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "one")), torch.tensor(losses(tmp_path / "straight")[2:]),
                               rtol=RTOL, atol=0)
    c = weights(tmp_path / "one" / "final")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=RTOL, atol=ATOL, msg=k)


def test_same_world_size_resume_is_bit_identical_with_dropout(tmp_path):
    """Each rank draws its own dropout masks (seed + rank); a sharded checkpoint gives every rank its streams back."""
    on_ranks(2, method="lora", out_dir=tmp_path / "straight", mbs=2, gbs=4, save_interval=2, dropout=0.1)
    copy_checkpoint(tmp_path / "straight", 2, tmp_path / "resumed")
    on_ranks(2, method="lora", out_dir=tmp_path / "resumed", mbs=2, gbs=4, resume="auto", dropout=0.1)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")[2:]
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    """1 -> 2: the one-process checkpoint (adapter + optimizer state) is loaded before sharding and its optimizer
    state sharded; the continuation equals the one-process run."""
    in_process(method="lora", out_dir=tmp_path / "straight", mbs=4, gbs=4, save_interval=2)
    copy_checkpoint(tmp_path / "straight", 2, tmp_path / "two")
    on_ranks(2, method="lora", out_dir=tmp_path / "two", mbs=2, gbs=4, resume="auto")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")),
                               torch.tensor(losses(tmp_path / "straight")[2:]), rtol=RTOL, atol=0)
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "two" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)


def test_a_rank_with_no_rows_still_joins_the_step():
    """A last batch of 1 row on 2 ranks: rank 0 gets a fully masked copy (no loss, no token) so both run the same
    forward/backward; full batches split into equal halves with trailing padding columns dropped."""
    batch = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.ones(3, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]), "sample_ids": [[0], [1], [2]]}
    lo, hi = shard_batch(batch, 0, 2), shard_batch(batch, 1, 2)
    assert lo["sample_ids"] == [[0]] and hi["sample_ids"] == [[1], [2]]
    assert hi["input_ids"].tolist() == [[4, 5], [8, 9]]  # padding columns of both rows dropped
    one = {k: v[:1] for k, v in batch.items()}
    empty = shard_batch(one, 0, 2)  # rows [0*1//2, 1*1//2) = none
    assert empty["input_ids"].shape == (1, 4) and (empty["labels"] == -100).all() and empty["attention_mask"].sum() == 0
    assert empty["sample_ids"] == [[]] and shard_batch(one, 1, 2)["labels"].sum() == 4


# ---- the command line: `leantune finetune ... --devices 2` through torchrun ------------------------------------------
def cli_args(ckpt, data, out_dir, max_steps, devices=2, num_nodes=1):
    return ["finetune", "lora", "--devices", str(devices), "--num_nodes", str(num_nodes), "--checkpoint_dir", str(ckpt),
            "--data", "JSON",
            "--data.json_path", str(data), "--out_dir", str(out_dir), "--train.micro_batch_size", "1",
            "--train.global_batch_size", "2", "--train.max_steps", str(max_steps), "--train.save_interval", "2",
            "--train.max_seq_length", "64", "--train.warmup_steps", "1", "--eval.exact_match", "false",
            "--eval.sample_new_tokens", "0", "--eval.max_batches", "1", "--lora.r", "4", "--fsdp.timeout", "30",
            "--threads", "1"]


def workers_of(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers started by process `pid` (read from /proc: ppid and RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds rank 1's process through /proc (Linux)")
def test_devices_2_trains_and_a_killed_rank_ends_the_job_with_the_last_checkpoint_intact(
        tiny_checkpoint, json_data, tmp_path):
    """The real launcher. A short run prints one summary (rank 0 only) and writes the consolidated adapter; the same
    run as two "nodes" of one process each (--num_nodes 2, c10d rendezvous at MASTER_ADDR:MASTER_PORT, here both on
    loopback) gives the same bytes; a long run whose rank 1 is SIGKILLed after its second checkpoint exits 2 with one
    error line naming the rank and the signal, within a bounded time, and its last complete checkpoint resumes in one
    process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks, on a GPU machine too
    done = subprocess.run([sys.executable, "-m", "leantune.cli", *cli_args(tiny_checkpoint, json_data,
                                                                            tmp_path / "short", 2)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trainable parameters") == 1, done.stdout
    single_node = weights(tmp_path / "short" / "final")
    assert list(single_node) == ["adapter.safetensors:" + k for k in sorted(load_file(
        tmp_path / "short" / "final" / "adapter.safetensors"))] and single_node

    node_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LEANTUNE_RDZV_ID": "test"}
    nodes = [subprocess.Popen([sys.executable, "-m", "leantune.cli", *cli_args(tiny_checkpoint, json_data,
                                                                               tmp_path / "nodes", 2, 1, 2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node_env)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [e[-2000:] for _, e in outs]
    assert sum(o.count("trainable parameters") for o, _ in outs) == 1
    two_nodes = weights(tmp_path / "nodes" / "final")
    assert two_nodes.keys() == single_node.keys() and all(torch.equal(two_nodes[k], single_node[k]) for k in two_nodes)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", *cli_args(tiny_checkpoint, json_data, out, 10**6)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (out / "step-000004" / STATE_FILE).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 4"
            time.sleep(0.2)
        ranks = workers_of(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], 9)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert time.monotonic() - killed < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 2, err[-3000:]
    assert "error: rank 1 was killed by SIGKILL" in err, err[-3000:]
    latest = find_latest_checkpoint(out)
    assert latest is not None and (latest / DCP_DIR / ".metadata").is_file()
    step = int(latest.name.split("-")[1])
    report = finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=out, data=JSON(json_path=json_data),
                      train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=step + 2, max_seq_length=64,
                                      warmup_steps=1, save_interval=2),
                      eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                      optimizer=OptimizerArgs(), method_args=LoRAArgs(r=4), resume="auto", threads=1)
    assert report["steps"] == step + 2


def test_settings_one_machine_cannot_honour_are_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="--fsdp.cpu_offload .* needs an accelerator"):
        check_fsdp_args(Parallel(rank=0, world_size=2), FSDPArgs(cpu_offload=True))
    with pytest.raises(ValueError, match="16-mixed .* not supported on several processes"):
        check_fsdp_args(Parallel(rank=0, world_size=2), FSDPArgs(), "16-mixed")
    with pytest.raises(ValueError, match="bnb.AdamW8bit: bitsandbytes' optimizers cannot step FSDP's sharded"):
        check_fsdp_args(Parallel(rank=0, world_size=2), FSDPArgs(), "32-true", "bnb.AdamW8bit")
    with pytest.raises(ValueError, match="runs in one process only"):
        check_parallel_method(Parallel(rank=0, world_size=2), get_method("adalora"))
    with pytest.raises(ValueError, match="--fsdp.timeout must be > 0"):
        FSDPArgs(timeout=0)
    assert distributed.fsdp_available()  # this torch; an older one is refused in one line
    monkeypatch.setattr(distributed, "fsdp_available", lambda: False)
    with pytest.raises(ValueError, match=r"several processes need FSDP2's plain SUM reductions .* upgrade torch"):
        check_fsdp_args(Parallel(rank=0, world_size=2), FSDPArgs())
    check_fsdp_args(Parallel(rank=0, world_size=1), FSDPArgs())  # one process needs none
    with pytest.raises(ValueError, match="is not a multiple of micro_batch_size 2 x 2 processes = 4"):
        accumulation_steps(TrainArgs(micro_batch_size=2, global_batch_size=6), Parallel(rank=0, world_size=2))


def test_the_readme_commands_of_the_multi_gpu_section_parse(capsys):
    """The section's ```sh examples (not run: they need GPUs and nodes) keep flags that exist and values that parse."""
    from leantune.cli import main

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Multi-GPU and multi-node (torchrun + FSDP2)", 1)[1].split("\n## ", 1)[0]
    lines = section.replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line.split("leantune.cli" if "leantune.cli" in line else "leantune ", 1)[1], comments=True)
             for line in lines if "finetune " in line and not line.lstrip().startswith("#")]
    assert len(argvs) >= 4
    for argv in argvs:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--print_config"])
        assert e.value.code in (0, None), f"{argv}: {capsys.readouterr().err}"


class OneRankFSDP(Parallel):
    """One process that still shards (a 1-rank mesh): FSDP's own arithmetic and overhead against the plain run."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the 1-GPU FSDP run against the plain run is unmeasured"))])
def test_one_process_under_fsdp_equals_the_plain_run(device, tmp_path, monkeypatch):
    """The same 4 steps with and without fully_shard on one rank: same losses and tensors (fp32), and the time of
    each, printed (on a GPU this is FSDP's throughput overhead on one device)."""
    import torch.distributed as dist

    dev = torch.device(device)
    original_build = build

    def on_device(method, quantize=None, dropout=0.0):
        model, names = original_build(method, quantize, dropout)
        return model.to(dev), names

    monkeypatch.setattr(sys.modules[__name__], "build", on_device)
    in_process(method="lora", out_dir=tmp_path / "warm-up", mbs=4, gbs=8, steps=1)  # first-call costs out of the times
    t0 = time.perf_counter()
    in_process(method="lora", out_dir=tmp_path / "plain", mbs=4, gbs=8)
    plain_s = time.perf_counter() - t0
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        t0 = time.perf_counter()
        in_process(method="lora", out_dir=tmp_path / "fsdp", mbs=4, gbs=8,
                   parallel=OneRankFSDP(rank=0, world_size=1, device=dev))
        fsdp_s = time.perf_counter() - t0
    finally:
        dist.destroy_process_group()
    print(f"\n{device}: plain {plain_s:.2f} s, FSDP on one rank {fsdp_s:.2f} s ({fsdp_s / plain_s:.2f}x)")
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp")


class Seq2SeqData:
    """TinyData's contract with encoder-decoder batches: encoder inputs and mask, decoder labels and inputs."""

    def __init__(self, n: int = 48, micro_batch_size: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = [(i, torch.randint(1, 96, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g),
                      torch.randint(1, 96, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g))
                     for i in range(n)]
        self.mbs = micro_batch_size

    def _collate(self, rows):
        B, S, T = len(rows), max(len(r[1]) for r in rows), max(len(r[2]) for r in rows)
        ids, mask, labels = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long), torch.full(
            (B, T), -100)
        for j, (_, src, tgt) in enumerate(rows):
            ids[j, :len(src)], mask[j, :len(src)], labels[j, :len(tgt)] = src, 1, tgt
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": shift_right(labels, 0, 0), "sample_ids": [[r[0]] for r in rows]}

    def train_dataloader(self, epoch: int = 0):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [self._collate([self.rows[k] for k in order[s:s + self.mbs]])
                for s in range(0, len(order) - self.mbs + 1, self.mbs)]

    def val_dataloader(self):
        return [self._collate(self.rows[:4])]


def test_t5_on_two_ranks_is_as_close_as_float_rounding_allows(tmp_path, monkeypatch):
    """flan-t5's kind: encoder and decoder blocks sharded one by one, seq2seq batches split by rows (not trimmed:
    encoder and decoder lengths differ), LoRA on q/v; within 3x one process's own micro-batch floor (+1e-6)."""
    def t5(method, quantize=None, dropout=0.0):
        torch.manual_seed(0)
        model = T5(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                            dropout_rate=0.0))
        return model, apply_method(model, method, LoRAArgs(r=4, dropout=0.0))

    monkeypatch.setattr(sys.modules[__name__], "build", t5)
    monkeypatch.setattr(sys.modules[__name__], "TinyData", Seq2SeqData)
    in_process(method="lora", out_dir=tmp_path / "one", mbs=4, gbs=8, steps=2)
    in_process(method="lora", out_dir=tmp_path / "floor", mbs=2, gbs=8, steps=2)
    on_ranks(2, method="lora", out_dir=tmp_path / "two", mbs=2, gbs=8, steps=2)
    (floor_loss, floor_w), (loss, w) = max_difference(tmp_path / "one", tmp_path / "floor"), max_difference(
        tmp_path / "one", tmp_path / "two")
    assert loss <= 3 * floor_loss + 1e-6 and w <= 3 * floor_w + 1e-6, (loss, floor_loss, w, floor_w)


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "--devices must be an integer >= 1, got 0"),
    (["--num_nodes", "-2"], "--num_nodes must be an integer >= 1, got -2"),
    (["--fsdp.timeout", "0"], "--fsdp.timeout must be > 0 seconds"),
    (["--devices", "2", "--num_nodes", "2"], "--num_nodes 2: set MASTER_ADDR and MASTER_PORT"),
])
def test_bad_multi_process_flags_exit_2_before_anything_starts(flags, message, tmp_path, capsys, monkeypatch):
    from leantune.cli import main

    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["finetune", "lora", *flags, "--checkpoint_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
