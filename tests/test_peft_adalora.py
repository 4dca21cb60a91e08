"""AdaLoRA against peft's implementation: logits, loss with the orthogonality regulariser, optimizer steps, the
budget schedule and the masks of the rank allocator, trainable counts, PEFT folders both ways (with pruned ranks),
merge, a quantized base, and exact resume through the one loop."""

import dataclasses
import json
import shutil
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from tiny_families import V, make_hf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.cli import main
from leantune.data import JSON
from leantune.estimate import estimate
from leantune.export import export_peft_adapter
from leantune.finetune import finetune
from leantune.inference import load_for_inference
from leantune.methods import METHODS, load_any_adapter
from leantune.models.decoder.families import config_from_checkpoint
from leantune.models.quantize import quantize_model
from leantune.peft.adalora import allocate, budget_schedule
from leantune.peft.adalora_layers import (
    AdaLoRAArgs,
    adalora_layers,
    apply_adalora,
    merge_adalora,
    orth_regularizer,
)
from leantune.peft.peft_format import ADALORA, peft_modules
from leantune.peft.peft_format import adalora_triplet as _triplet
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs
from leantune.train.step import train_step

export_peft, import_peft = ADALORA.export, ADALORA.load


def _hf_modules(model):
    """(HF module path, our layer, part) for each PEFT module of the model's AdaLoRA."""
    return [(site.hf, layer, part) for site, layer, part in peft_modules(model, ADALORA)]

SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]




def make_peft(base, target_modules, **cfg):
    """peft's AdaLoRA on the base, with non-zero singular values (E starts at zero)."""
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    config = peft.AdaLoraConfig(**{**SCHEDULE, **cfg}, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                target_modules=target_modules, fan_in_fan_out=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    return pm


def peft_triplets(ours, pm):
    """[(our A, E, B views, peft's A, E, B)] for each PEFT module."""
    modules = dict(pm.base_model.model.named_modules())
    return [(_triplet(mod, j), tuple(getattr(modules[path], f)["default"] for f in ("lora_A", "lora_E", "lora_B")))
            for path, mod, j in _hf_modules(ours)]


def with_schedule(model, **schedule):
    for m in adalora_layers(model):
        m.args = dataclasses.replace(m.args, **schedule)


def shifted(idx):
    return torch.cat([idx[:, 1:], torch.full((idx.shape[0], 1), -100)], 1)


@pytest.mark.parametrize("name,targets,ours_targets", [
    ("llama-gqa", ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], ["query", "value", "mlp"]),
    ("qwen2-qkv-bias", LLAMA_ALL + ["lm_head"], "all"),
])
def test_training_matches_peft(tmp_path, name, targets, ours_targets):
    """Same weights: same logits, same loss with the regulariser, same trainable count (also via estimate); then 8
    AdamW steps with rank allocation (warmup, budget, final phase): same weights and the same masks at every step;
    the final adapter saved by either side loads in the other with the same logits."""
    base = make_hf(name, tmp_path)
    pm = make_peft(base, targets)
    pm.save_pretrained(tmp_path / "start")
    ours = load_hf_checkpoint(base)
    args = import_peft(ours, tmp_path / "start")
    assert args.targets == AdaLoRAArgs(targets=ours_targets).targets and (args.init_r, args.target_r) == (6, 2)
    with_schedule(ours, tinit=1, tfinal=2, total_step=8)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    n_peft = pm.get_nb_trainable_parameters()[0]
    assert sum(p.numel() for p in trainable) == n_peft
    cfg = config_from_checkpoint(base)
    assert estimate(cfg, "adalora", dataclasses.replace(args, targets=ours_targets), "32-true")["trainable_params"] == n_peft

    idx = torch.randint(0, V, (2, 12))
    pm.train(), ours.train()
    with torch.no_grad():
        out = pm(input_ids=idx, labels=idx)
        logits = ours(idx)
        torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        torch.testing.assert_close(ce + orth_regularizer(ours), out.loss, atol=1e-5, rtol=0)

    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    opt_o = torch.optim.AdamW(trainable, lr=1e-3)
    pairs = peft_triplets(ours, pm)
    kept = []
    for step in range(8):
        idx = torch.randint(0, V, (2, 12))
        pm(input_ids=idx, labels=idx).loss.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        train_step(ours, [{"input_ids": idx, "labels": shifted(idx)}], opt_o, trainable,
                   regularizer=lambda: orth_regularizer(ours), after_step=lambda s=step: allocate(ours, s, 8))
        for a, b in pairs:
            assert torch.equal(a[1] != 0, b[1] != 0), f"step {step}: masks differ"
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-5 if step == 0 else 1e-4, rtol=0)
        kept.append(sum(int((a[1] != 0).sum()) for a, _ in pairs))
    n = len(pairs)
    assert kept[:2] == [6 * n, 6 * n] and kept[1] > kept[2] > kept[5] and kept[5:] == [2 * n] * 3  # warmup, budget, final

    idx = torch.randint(0, V, (2, 12))
    pm.eval(), ours.eval()
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(pm(idx).logits, expected, atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path / "peft-trained")
    saved = json.loads((tmp_path / "peft-trained" / "adapter_config.json").read_text())
    exported = export_peft(ours, tmp_path / "ours-trained", str(base), args)
    written = json.loads((exported / "adapter_config.json").read_text())
    assert written["rank_pattern"] == saved["rank_pattern"] and sum(map(sum, written["rank_pattern"].values())) == 2 * n
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(hf, exported).eval()
    back = load_hf_checkpoint(base).eval()
    manifest = load_any_adapter(back, tmp_path / "peft-trained")
    assert manifest["method"] == "adalora"
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(idx), expected, atol=1e-5, rtol=0)


def test_allocator_matches_peft_on_identical_gradients(tmp_path):
    """Fed the same gradients, our allocator and peft's give the same budget and bit-identical masked singular values
    at every step of a schedule with deltaT 2 (warmup, budget steps with and without allocation, final phase)."""
    base = make_hf("llama-gqa", tmp_path)
    pm = make_peft(base, LLAMA_ALL, deltaT=2, total_step=10, tfinal=3)
    pm.save_pretrained(tmp_path / "start")
    ours = load_hf_checkpoint(base)
    import_peft(ours, tmp_path / "start")
    with_schedule(ours, tinit=1, tfinal=3, total_step=10, delta_t=2)
    pairs = peft_triplets(ours, pm)
    allocator = pm.base_model.rankallocator
    g = torch.Generator().manual_seed(0)
    for step in range(10):
        for layer in adalora_layers(ours):
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.grad = torch.zeros_like(p)
        for (a, e, b), theirs in pairs:  # our A/E/B are views of the stacked tensors: write through their grads
            for x, y in zip((a, e, b), theirs):
                y.grad = torch.randn(y.shape, generator=g)
                _grad_view(ours, x).copy_(y.grad)
        pm.base_model.update_and_allocate(step)
        allocate(ours, step, 10)
        budget, _ = allocator.budget_schedule(step)
        assert budget == budget_schedule(step, 1, 3, 10, 2, allocator.init_bgt, allocator.target_bgt)[0]
        for (_, e, _), (_, theirs_e, _) in pairs:
            assert torch.equal(e, theirs_e), f"step {step}: singular values differ after masking"
    assert sum(int((e != 0).sum()) for (_, e, _), _ in pairs) == allocator.target_bgt


def _grad_view(model, view):
    """The slice of its parameter's .grad that a view of the parameter covers."""
    for p in model.parameters():
        if p.grad is not None and view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            offset = (view.data_ptr() - p.data_ptr()) // p.element_size()
            return p.grad.view(-1)[offset:offset + view.numel()].view(view.shape)
    raise KeyError("no parameter holds this view")


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adalora_layers(model):
            m.lora_E.copy_(torch.randn(m.lora_E.shape, generator=g))
            m.lora_E[::3] = 0  # pruned triplets, as the allocator leaves them


@pytest.mark.parametrize("name,targets", [("pythia-partial-rotary", ["query", "key", "value", "mlp", "head"]),
                                          ("gpt2", ["query", "key", "value", "projection"])])
def test_fused_qkv_family_both_ways(tmp_path, name, targets):
    """GPT-NeoX (q/k/v fused per head group) and GPT-2 (fused, Conv1D): the whole qkv is one PEFT module; our
    export loads in peft with our logits, and peft's folder imports with peft's logits."""
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = AdaLoRAArgs(init_r=4, target_r=2, alpha=8, dropout=0.0, targets=targets)
    apply_adalora(ours, args)
    randomize(ours)
    assert all(len(m.parts) == 1 for m in adalora_layers(ours))
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and all(sum(v) == 2 for v in written["rank_pattern"].values())
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, expected, atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path / "resaved")  # peft's own folder of the same adapter
    back = load_hf_checkpoint(base).eval()
    assert import_peft(back, tmp_path / "resaved").targets == args.targets
    with torch.no_grad():
        torch.testing.assert_close(back(idx), expected, atol=1e-5, rtol=0)

    partial = load_hf_checkpoint(base)
    apply_adalora(partial, AdaLoRAArgs(targets=["query", "value"]))
    assert [m.parts for m in adalora_layers(partial)][0] == [(0, 64), (128, 192)]
    with pytest.raises(ValueError, match="query,key,value"):
        export_peft(partial, tmp_path / "no", str(base), AdaLoRAArgs())


def test_merged_equals_unmerged_and_loads_in_transformers(tmp_path):
    base = make_hf("smollm2-tied", tmp_path)
    ours = load_hf_checkpoint(base).eval()
    apply_adalora(ours, AdaLoRAArgs(init_r=4, target_r=2, dropout=0.0, targets="all"))
    randomize(ours)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = ours(idx)
        layers = [m for m in adalora_layers(ours) if m is not ours.lm_head]  # in place would move the tied embedding
        for m in layers:
            m.merge()
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)
        for m in layers:
            m.unmerge()
        METHODS["adalora"].merge(ours, 1.0)
        assert not adalora_layers(ours) and not ours.config.tie_embeddings  # the head's update unties it
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)
    save_hf_checkpoint(ours, tmp_path / "merged", source_dir=base)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-5, rtol=0)


def test_quantized_base_trains_unmerged_and_merges_dequantized(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    ours = quantize_model(load_hf_checkpoint(base), "bnb.nf4", torch.float32)
    names = apply_adalora(ours, AdaLoRAArgs(init_r=4, target_r=2, dropout=0.0, targets="all", total_step=4))
    trainable = [p for n, p in ours.named_parameters() if n in names]
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if n not in names}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(4):
        idx = torch.randint(0, V, (2, 12))
        train_step(ours, [{"input_ids": idx, "labels": shifted(idx)}], opt, trainable,
                   regularizer=lambda: orth_regularizer(ours), after_step=lambda s=step: allocate(ours, s, 4))
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)
    ours.eval()
    with torch.no_grad():
        expected = ours(idx)
        merge_adalora(ours)
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)


def small_run(ckpt, data, out_dir, resume=None):
    return finetune("adalora", checkpoint_dir=ckpt, out_dir=out_dir, data=JSON(json_path=data), resume=resume,
                    train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=6, max_seq_length=128,
                                    warmup_steps=1, save_interval=2),
                    eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                    optimizer=OptimizerArgs(lr=1e-2), threads=2,
                    method_args=AdaLoRAArgs(init_r=4, target_r=2, dropout=0.1, targets=["query", "value", "mlp"],
                                            tinit=1, tfinal=3))


def test_resume_is_bit_identical_across_the_allocation_phases(tiny_checkpoint, json_data, tmp_path):
    """6 steps straight == 2 (or 4) + resume + the rest, bit for bit: resumed in the budgeting phase (the importance
    averages must come back) and after the final pattern was fixed at step index 3 (the mask must come back)."""
    small_run(tiny_checkpoint, json_data, tmp_path / "a")
    straight = load_file(tmp_path / "a" / "final" / "adapter.safetensors")
    for stop, kept in ((2, "ipt_A"), (4, "rank_mask")):
        step_dir = f"step-{stop:06d}"
        assert {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "a" / step_dir / "method_state.safetensors")} == (
            {"ipt_A", "unc_A", "ipt_E", "unc_E", "ipt_B", "unc_B"} if kept == "ipt_A" else {"rank_mask"})
        shutil.copytree(tmp_path / "a" / step_dir, tmp_path / f"b{stop}" / step_dir)
        assert small_run(tiny_checkpoint, json_data, tmp_path / f"b{stop}", resume="auto")["steps"] == 6
        resumed = load_file(tmp_path / f"b{stop}" / "final" / "adapter.safetensors")
        assert straight.keys() == resumed.keys() and all(straight[k].equal(resumed[k]) for k in straight), stop
    e = [t for k, t in straight.items() if k.endswith(".lora_E")]
    assert sum(int((t != 0).sum()) for t in e) == 2 * sum(t.numel() // 4 for t in e)  # target_r per PEFT module

    # the trained adapter through `export --format peft` loads in peft with our logits
    out = export_peft_adapter(tmp_path / "a" / "final", tiny_checkpoint, tmp_path / "peft")
    assert sum(map(sum, json.loads((out / "adapter_config.json").read_text())["rank_pattern"].values())) == 2 * 10
    ours, _, _, _ = load_for_inference(tiny_checkpoint, adapter=tmp_path / "a" / "final")
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, out).eval()
    idx = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx), atol=1e-5, rtol=0)


def test_flags_help_and_schedule_defaults(capsys):
    args = AdaLoRAArgs()
    assert (args.init_r, args.target_r, args.targets) == (12, 8, ["query", "value"])
    assert args.schedule(100) == (10, 20, 100) and args.schedule(3) == (0, 1, 3)
    assert AdaLoRAArgs(total_step=50, tinit=5).schedule(7) == (5, 10, 50)
    for bad, flag in ((dict(target_r=13), "--adalora.target_r"), (dict(targets="qkv"), "--adalora.targets"),
                      (dict(beta1=1.0), "--adalora.beta1"), (dict(total_step=10, tinit=5, tfinal=5), "tinit")):
        with pytest.raises(ValueError, match=flag):
            AdaLoRAArgs(**bad)
    with pytest.raises(SystemExit):
        main(["finetune", "adalora", "--help"])
    out = capsys.readouterr().out
    assert "--adalora.target_r" in out and "--adalora.orth_reg_weight" in out and "AdaLoRA" in out
