"""Precision modes through the one loop on CPU: bf16-true trains bf16 tensors, bf16-mixed keeps fp32 masters and
runs the matmuls in bf16 under autocast, both follow the fp32 loss curve closely; fp16 modes need a GPU (tested
there when one is present)."""

import csv

import pytest
import torch
from conftest import TinyData, V, make_model
from method_cases import EVERY_METHOD, tiny_args

from leantune.methods import apply_method, load_trainable, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.lora import LoRAArgs
from leantune.runtime import cast_frozen_matrices, resolve_precision, restore_dtypes
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


def train_steps(method: str, precision: str, out_dir, steps: int = 20):
    """`steps` optimizer steps of `method` (tiny args) on the tiny GPT; the losses, and the dtypes the frozen block
    weights had while a step ran (seen by a forward hook)."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))  # room for
    names = apply_method(model, method, tiny_args(method))  # virtual tokens besides the longest sample
    frozen_seen = set()
    mlp = model.transformer.h[1].mlp
    mlp.register_forward_hook(lambda m, i, o: frozen_seen.update(
        p.dtype for n, p in m.named_parameters() if not p.requires_grad and n.endswith("weight")))
    fit(model, names, TinyData(micro_batch_size=2), out_dir,
        lambda p: save_checkpoint(p, model, method, names, {"method": method}, checkpoint_dir=None),
        lambda p: load_trainable(model, method, p),
        TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=steps, warmup_steps=2),
        EvalArgs(sample_new_tokens=0), OptimizerArgs(lr=3e-3), precision=precision, device=torch.device("cpu"))
    with open(out_dir / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    return losses, frozen_seen, model


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_bf16_mixed_on_cpu_follows_fp32_for_20_steps(method, tmp_path):
    """The CPU default on bf16 hardware (bf16-mixed: bf16 frozen base, fp32 trained tensors) tracks fp32 training:
    every one of 20 losses within 2% of fp32's, for every method."""
    ref, _, _ = train_steps(method, "32-true", tmp_path / "fp32")
    mixed, frozen_seen, model = train_steps(method, "bf16-mixed", tmp_path / "mixed")
    assert len(ref) == len(mixed) == 20
    torch.testing.assert_close(torch.tensor(mixed), torch.tensor(ref), rtol=2e-2, atol=0)
    if method != "full":  # full finetuning trains every weight: nothing frozen to store in bf16
        assert frozen_seen == {torch.bfloat16}
    # after fit the model is back in the dtypes it came in (exact match, merge and export read it next)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}


def test_cast_frozen_matrices_keeps_trained_tensors_norms_and_a_tied_head():
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    model.lm_head.weight = model.transformer.wte.weight  # tied, as SmolLM2's
    names = apply_method(model, "lora", LoRAArgs(r=4, targets="all"))
    cast = cast_frozen_matrices(model, names, torch.bfloat16)
    params = dict(model.named_parameters())
    assert cast and all(params[n].dtype == torch.bfloat16 and not params[n].requires_grad for n in cast)
    assert all(params[n].dtype == torch.float32 for n in names)  # LoRA A/B: fp32 masters
    assert model.transformer.wte.weight.dtype == torch.float32  # the tied head/embedding keeps the stream fp32
    assert all(p.dtype == torch.float32 for n, p in params.items() if "norm" in n)
    restore_dtypes(model, cast)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_precision_follows_the_cpu_bf16_units(monkeypatch):
    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"),
                                       (False, False, "32-true")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_precision("auto", cpu, training=True) == expected
        assert resolve_precision(None, cpu, training=True) == expected
        assert resolve_precision("auto", cpu) == "32-true"  # inference stays fp32 (equal to transformers)


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_mixed_attention_runs_in_fp32_with_or_without_amx(monkeypatch, request, amx):
    """Under CPU bf16 autocast RoPE and attention take fp32 q, k, v whether or not the CPU has AMX (CPU flash
    attention's bf16 backward is slower than its fp32 one on both); the products and gradients match fp32's."""
    from leantune import runtime
    from leantune.models.decoder import model as decoder

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    runtime.cpu_has_amx.cache_clear()  # read once per process: this test's answer, then the machine's again
    request.addfinalizer(runtime.cpu_has_amx.cache_clear)
    assert runtime.cpu_has_amx() == amx
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(
        (q.dtype, torch.is_autocast_enabled("cpu"))) or sdpa(q, k, v, **kw))
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    x = torch.randint(0, V, (2, 12))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen[-2:] == [(torch.float32, False)] * 2, seen  # fp32 q, autocast paused around SDPA
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)  # bf16 matmuls: ~3 significant digits
    for cache_dtype in (torch.float32, torch.bfloat16):  # KV-cache decoding under autocast (samples during training)
        model.set_kv_cache(2, 16, dtype=cache_dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.decode(x, torch.arange(12))
            step = model.decode(x[:, -1:], torch.tensor([12]))
        model.clear_kv_cache()
        torch.testing.assert_close(logits.float(), ref, rtol=0.05, atol=0.05)
        assert step.shape == (2, 1, V) and torch.isfinite(step.float()).all()


def test_a_frozen_fp32_head_is_cast_once_while_its_values_stay():
    """bf16-mixed with a tied fp32 head: the bf16 copy the head's GEMMs use is made once, and made again when the
    weight changes in place (a resume's load) or another tensor comes."""
    from leantune.train.loss import frozen_copy, release_head_caches

    w = torch.randn(8, 4)
    first = frozen_copy(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and frozen_copy(w, torch.bfloat16) is first
    w.mul_(2)  # in place: a new version
    second = frozen_copy(w, torch.bfloat16)
    assert second is not first and torch.equal(second, (w.to(torch.bfloat16)))
    other = w.clone()
    assert frozen_copy(other, torch.bfloat16) is not second
    assert frozen_copy(w, torch.float32) is w
    release_head_caches()
    assert frozen_copy(other, torch.bfloat16) is not second


def test_a_failed_bf16_mixed_run_gives_the_model_back_in_its_dtypes_and_frees_the_head_caches(tmp_path):
    """fit's cleanup runs when training raises too: a notebook that catches the error reuses the model in fp32 and
    does not keep the head loss's scratch buffers (~300 MB on the default model) or the frozen head's bf16 copy."""
    from leantune.train import loss as loss_mod

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    model.lm_head.weight = model.transformer.wte.weight  # tied and frozen: the head loss keeps a bf16 copy of it
    names = apply_method(model, "lora", LoRAArgs(r=4, dropout=0.0))  # q and v: the head stays the fused loss's
    held = {}

    def failing_save(path):
        held.update(workspaces=len(loss_mod._workspaces), copies=len(loss_mod._frozen_copies),
                    dtypes={p.dtype for p in model.parameters()})
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fit(model, names, TinyData(micro_batch_size=2), tmp_path, failing_save, lambda p: None,
            TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=3, save_interval=1),
            EvalArgs(sample_new_tokens=0), OptimizerArgs(lr=1e-3), precision="bf16-mixed")
    assert held["workspaces"] and held["copies"] and torch.bfloat16 in held["dtypes"]  # what the run held
    assert not loss_mod._workspaces and not loss_mod._frozen_copies
    assert {p.dtype for p in model.parameters()} == {torch.float32}
