"""Precision modes through the one loop on CPU: bf16-true trains bf16 tensors, bf16-mixed keeps fp32 masters and
runs the matmuls in bf16 under autocast, both follow the fp32 loss curve closely; fp16 modes need a GPU (tested
there when one is present)."""

import csv

import pytest
import torch
from conftest import TinyData, make_model

from leantune.methods import load_trainable, save_checkpoint
from leantune.runtime import resolve_precision
from leantune.train.loop import EvalArgs, TrainArgs, fit
from leantune.train.optim import OptimizerArgs


def train(method: str, precision: str, out_dir, device: str = "cpu"):
    model, names = make_model(method, dropout=0.0)
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    seen = set()  # output dtypes of the first block's qkv projection, to see what the matmuls ran in
    model.transformer.h[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    fit(model, names, TinyData(micro_batch_size=2), out_dir,
        lambda p: save_checkpoint(p, model, method, names, {"method": method}, checkpoint_dir=None),
        lambda p: load_trainable(model, method, p),
        TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=6, warmup_steps=2),
        EvalArgs(sample_new_tokens=0), OptimizerArgs(lr=1e-2), precision=precision, device=torch.device(device))
    with open(out_dir / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    params = dict(model.named_parameters())
    return losses, {params[n].dtype for n in names}, seen


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_modes_follow_the_fp32_loss_curve(method, tmp_path):
    ref, ref_dtypes, ref_seen = train(method, "32-true", tmp_path / "fp32")
    true_losses, true_dtypes, true_seen = train(method, "bf16-true", tmp_path / "bf16-true")
    mixed_losses, mixed_dtypes, mixed_seen = train(method, "bf16-mixed", tmp_path / "bf16-mixed")
    assert ref_dtypes == {torch.float32} and ref_seen == {torch.float32}
    assert true_dtypes == {torch.bfloat16} and true_seen == {torch.bfloat16}
    assert mixed_dtypes == {torch.float32}  # fp32 master weights ...
    assert mixed_seen == {torch.bfloat16}  # ... and bf16 matmuls
    assert len(ref) == len(true_losses) == len(mixed_losses) == 6
    # bf16 keeps 8 mantissa bits: the loss curves agree to ~1%, fp32 masters track fp32 more closely than bf16-true
    torch.testing.assert_close(torch.tensor(mixed_losses), torch.tensor(ref), rtol=1e-2, atol=0)
    torch.testing.assert_close(torch.tensor(true_losses), torch.tensor(ref), rtol=3e-2, atol=0)


def test_fp16_precisions_are_refused_on_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("16-mixed", torch.device("cpu"))
    with pytest.raises(ValueError, match="is not one of"):
        resolve_precision("bf16", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
def test_gpu_precisions_follow_the_fp32_loss_curve(precision, tmp_path):
    ref, _, _ = train("lora", "32-true", tmp_path / "fp32", device="cuda")
    losses, dtypes, seen = train("lora", precision, tmp_path / precision, device="cuda")
    half = torch.float16 if precision.startswith("16") else torch.bfloat16
    assert seen == {half} and dtypes == ({half} if precision.endswith("true") else {torch.float32})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=3e-2, atol=0)
