"""The one training loop: exact resume, token-weighted accumulation, golden losses, non-finite stop."""

import csv
import shutil

import pytest
import torch

from leantune.config import Config
from leantune.methods import apply_method, load_trainable, save_checkpoint
from leantune.model import GPT
from leantune.peft.lora import LoRAArgs
from leantune.train.loop import EvalArgs, NonFiniteError, TrainArgs, fit
from leantune.train.optim import OptimizerArgs

V = 89


class TinyData:
    """Deterministic samples of unequal lengths, right-padded, labels pre-shifted with a masked prompt part."""

    def __init__(self, n: int = 48, seed: int = 0, micro_batch_size: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            length = int(torch.randint(6, 20, (1,), generator=g))
            ids = torch.randint(0, V, (length,), generator=g)
            labels = torch.cat([ids[1:], torch.tensor([-100])])
            labels[: length // 3] = -100  # "prompt" tokens are not supervised
            self.samples.append((i, ids, labels))
        self.mbs = micro_batch_size
        self.seed = seed

    def _collate(self, rows):
        T = max(len(r[1]) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for j, (_, i, lab) in enumerate(rows):
            ids[j, : len(i)], labels[j, : len(i)], mask[j, : len(i)] = i, lab, 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "sample_ids": [[r[0]] for r in rows]}

    def train_dataloader(self, epoch: int = 0):
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return [self._collate([self.samples[k] for k in order[s:s + self.mbs]])
                for s in range(0, len(order) - self.mbs + 1, self.mbs)]

    def val_dataloader(self):
        return [self._collate(self.samples[s:s + 4]) for s in range(0, 8, 4)]


def make_model(method: str, dropout: float = 0.1):
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    args = LoRAArgs(r=4, dropout=dropout, targets="all") if method == "lora" else None
    names = apply_method(model, method, args)
    return model, names


class FakeTokenizer:
    bos_id, eos_ids, pad_id = None, [1], 0


def run(method, out_dir, resume=None, data=None, save_interval=None, max_steps=6, mbs=2, gbs=4, optimizer=None,
        epochs=1):
    model, names = make_model(method)
    data = data or TinyData(micro_batch_size=mbs)
    manifest = {"method": method}

    def save_fn(path):
        save_checkpoint(path, model, method, names, manifest, checkpoint_dir=None)

    summary = fit(model, names, data, out_dir, save_fn, lambda p: load_trainable(model, method, p),
                  TrainArgs(micro_batch_size=mbs, global_batch_size=gbs, max_steps=max_steps, warmup_steps=2,
                            save_interval=save_interval, epochs=epochs),
                  EvalArgs(sample_new_tokens=0), optimizer or OptimizerArgs(lr=1e-2), resume=resume)
    return model, names, summary


def losses(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_is_bit_identical(method, tmp_path):
    straight, names, _ = run(method, tmp_path / "a", save_interval=3)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    resumed, _, summary = run(method, tmp_path / "b", resume="auto")
    assert summary["steps"] == 6
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    for n in names:
        assert torch.equal(a[n], b[n]), n
    assert losses(tmp_path / "a")[3:] == losses(tmp_path / "b")


@pytest.mark.parametrize("name", ["bnb.AdamW8bit", "bnb.PagedAdamW8bit"])
def test_bitsandbytes_optimizers_train_and_resume_exactly(name, tmp_path):
    """8-bit optimizer state (block-quantized moments) round-trips through the checkpoint bit for bit.
    min_8bit_size=16 makes the tiny model's tensors use 8-bit state too (bitsandbytes' default skips < 4096)."""
    opt = OptimizerArgs(name=name, lr=1e-2, extra={"min_8bit_size": 16})
    straight, names, _ = run("lora", tmp_path / "a", save_interval=3, optimizer=opt)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    state = torch.load(tmp_path / "a" / "step-000003" / "training_state.pt", weights_only=False)
    def tensors(d):  # bitsandbytes nests its quantized moments in a sub-dict
        for v in d.values():
            yield from tensors(v) if isinstance(v, dict) else [v]
    assert any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in tensors(state["optimizer"]["state"]))
    resumed, _, _ = run("lora", tmp_path / "b", resume="auto", optimizer=opt)
    untouched, _ = make_model("lora")
    base = dict(untouched.named_parameters())
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    for n in names:
        assert torch.equal(a[n], b[n]), n
    assert any(not torch.equal(a[n], base[n]) for n in names)
    assert losses(tmp_path / "a")[3:] == losses(tmp_path / "b")


def test_accumulation_windows_give_the_same_update(tmp_path):
    """1x8, 2x4 and 8x1 micro x accumulation: identical updates up to float summation order (atol 1e-6)."""
    results = []
    for mbs in (8, 4, 1):
        torch.manual_seed(0)
        model, names, _ = run("full", tmp_path / f"acc{mbs}", data=TinyData(n=8, micro_batch_size=mbs), max_steps=1,
                              mbs=mbs, gbs=8, optimizer=OptimizerArgs(name="SGD", lr=0.5))
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    untouched, _ = make_model("full")
    base = dict(untouched.named_parameters())
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], atol=1e-6, rtol=0)
    assert any(not torch.equal(results[0][n], base[n]) for n in results[0])


def test_golden_losses_fixed_seed(tmp_path):
    """A regression anchor: any change to the loss, schedule, masking or init shows up here."""
    run("lora", tmp_path, max_steps=4)
    got = [float(loss) for _, loss in losses(tmp_path)]
    expected = GOLDEN
    assert got == pytest.approx(expected, abs=1e-4), got


GOLDEN = [4.58908, 4.71644, 4.5916, 4.40442]  # recorded from this loop; ln(89) = 4.49 at init


def test_non_finite_loss_stops_with_step_and_samples(tmp_path):
    model, names = make_model("full")
    with torch.no_grad():
        model.transformer.h[1].mlp.proj.weight[3, 7] = float("nan")  # one poisoned weight
    data = TinyData()
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .* on samples \[\d+"):
        fit(model, names, data, tmp_path, lambda p: None, lambda p: None,
            TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=6, save_interval=1),
            EvalArgs(sample_new_tokens=0), OptimizerArgs(lr=1e-3))
    assert not list(tmp_path.glob("step-*")), "no checkpoint may be written from a poisoned state"


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path):
    run("lora", tmp_path, save_interval=2, max_steps=4)
    before = (tmp_path / "final" / "adapter.safetensors").read_bytes()

    calls = {"n": 0}
    model, names = make_model("lora")

    def failing_save(path):
        calls["n"] += 1
        save_checkpoint(path, model, "lora", names, {}, None)
        raise OSError("disk full")

    with pytest.raises(OSError):
        fit(model, names, TinyData(), tmp_path, failing_save, lambda p: None,
            TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2), EvalArgs(sample_new_tokens=0),
            OptimizerArgs(lr=1e-3))
    assert calls["n"] == 1
    assert (tmp_path / "final" / "adapter.safetensors").read_bytes() == before
