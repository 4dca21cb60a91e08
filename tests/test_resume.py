"""Exact resume through the real data path (JSON file -> DataLoader) with dropout on, for every method, and the
run configuration check: a resume with other data or method args is refused, naming the differing flags."""

import csv
import json
import shutil

import pytest
from method_cases import EVERY_METHOD, tiny_args
from safetensors.torch import load_file

from leantune.data import JSON
from leantune.finetune import finetune
from leantune.peft.lora import LoRAArgs
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs


def run(method, ckpt, data_path, out_dir, resume=None, max_steps=6, method_args=None, save_interval=3,
        precision=None):
    return finetune(method, checkpoint_dir=ckpt, out_dir=out_dir, data=JSON(json_path=data_path), precision=precision,
                    train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=max_steps, max_seq_length=128,
                                    warmup_steps=1, save_interval=save_interval),
                    eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                    optimizer=OptimizerArgs(lr=1e-2), method_args=method_args or tiny_args(method), resume=resume,
                    threads=2)


def weights(folder):
    """Every tensor of every safetensors file under a checkpoint folder (adapter or full model)."""
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def losses(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_resume_through_a_dataloader_is_bit_identical(method, tiny_checkpoint, json_data, tmp_path):
    """6 steps straight == 3 + resume + 3: same weights bit for bit, same logged losses (issue 11, item 2)."""
    run(method, tiny_checkpoint, json_data, tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    report = run(method, tiny_checkpoint, json_data, tmp_path / "b", resume="auto")
    assert report["steps"] == 6
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and a
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    assert losses(tmp_path / "a")[3:] == losses(tmp_path / "b")


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_resume_under_bf16_mixed_is_bit_identical(method, tiny_checkpoint, json_data, tmp_path, monkeypatch):
    """bf16-mixed (the CPU default where the CPU has bf16 units; asked for by name so every machine tests it): the
    frozen base goes to bf16 again on resume, the fp32 masters come back from the checkpoint, bit for bit."""
    run(method, tiny_checkpoint, json_data, tmp_path / "a", precision="bf16-mixed")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    monkeypatch.setattr("leantune.runtime.cpu_bf16_units", lambda: None)  # auto alone would now pick 32-true ...
    run(method, tiny_checkpoint, json_data, tmp_path / "b", resume="auto")  # ... unset on resume: the run's own
    assert json.loads((tmp_path / "b" / "final" / "run.json").read_text())["precision"] == "bf16-mixed"
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and a
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    assert losses(tmp_path / "a")[3:] == losses(tmp_path / "b")


def test_resume_with_other_data_is_refused(tiny_checkpoint, json_data, tmp_path):
    """`--resume auto` must not continue another run's checkpoint on other data (issue 11, item 3)."""
    run("lora", tiny_checkpoint, json_data, tmp_path / "run", max_steps=2, save_interval=2)
    other = tmp_path / "other.jsonl"
    other.write_text(json_data.read_text())
    with pytest.raises(ValueError, match=r"--data.json_path .*train.jsonl -> .*other.jsonl"):
        run("lora", tiny_checkpoint, other, tmp_path / "run", resume="auto", max_steps=4)


def test_resume_with_other_method_args_is_refused_before_loading_weights(tiny_checkpoint, json_data, tmp_path):
    """Another --lora.r gave a raw size-mismatch trace; now one message names the flag and both values."""
    run("lora", tiny_checkpoint, json_data, tmp_path, max_steps=2, save_interval=2)
    with pytest.raises(ValueError, match=r"--lora.r 4 -> 8") as e:
        run("lora", tiny_checkpoint, json_data, tmp_path, resume="auto", method_args=LoRAArgs(r=8, dropout=0.1))
    assert "--overwrite true or another --out_dir" in str(e.value)


def test_resume_may_extend_the_run(tiny_checkpoint, json_data, tmp_path):
    """Length and logging settings may differ on resume: a 2-step run continues to 4 steps."""
    run("lora", tiny_checkpoint, json_data, tmp_path, max_steps=2, save_interval=2)
    assert run("lora", tiny_checkpoint, json_data, tmp_path, resume="auto", max_steps=4, save_interval=1)["steps"] == 4
