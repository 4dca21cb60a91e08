"""DoRA against peft's `use_dora`: the fast row norm equals the direct formula, same logits (eval and dropout), same
optimizer step, same trainable counts, PEFT folders both ways, merge/unmerge, and a quantized base."""

import json

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from tiny_families import TINY, V, make_hf

from leantune.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from leantune.estimate import estimate
from leantune.methods import get_method, load_any_adapter
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import config_from_hf
from leantune.models.decoder.model import GPT
from leantune.models.quantize import dequantize_model, quantize_model
from leantune.peft.lora import DoRAArgs, LoRALinear, apply_dora, merge_lora
from leantune.peft.lora_dora import squared_row_norms
from leantune.peft.peft_format import LORA

export_peft = LORA.export


def import_peft(model, folder):
    """Load a PEFT LoRA folder; the names of the parameters it made trainable."""
    LORA.load(model, folder)
    return [n for n, p in model.named_parameters() if p.requires_grad]

HF_TARGETS = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "projection": "o_proj", "head": "lm_head",
              "mlp": ["gate_proj", "up_proj", "down_proj"]}




def randomize(model, magnitude=True):
    """Non-zero B and magnitudes off the row norms, so every DoRA term matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)
                if magnitude:
                    m.lora_magnitude.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude))


def hf_targets(targets):
    out = []
    for t in targets:
        out += HF_TARGETS[t] if isinstance(HF_TARGETS[t], list) else [HF_TARGETS[t]]
    return out


def test_dora_runs_in_float64():
    """The row norms accumulate in at least fp32: a float64 model keeps float64 (it raised a dtype error)."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=1, n_embd=64, n_head=4)).double()
    apply_dora(model, DoRAArgs(r=4, alpha=8))
    randomize(model)
    assert squared_row_norms(torch.ones(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert squared_row_norms(torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.float32
    qkv = model.transformer.h[0].attn.qkv
    direct = torch.linalg.norm(qkv.weight + qkv.delta_weight(), dim=1)
    torch.testing.assert_close(qkv.weight_norm(), torch.cat([direct[s:e] for s, e in qkv.parts]))
    assert model(torch.randint(0, V, (1, 6))).dtype == torch.float64


def test_fast_row_norm_equals_the_direct_formula():
    """||W_r + s B_r A|| from (out, r) products == torch.linalg.norm of the formed weight (fp32, 1e-5), per part of a
    fused qkv (query and value only) and on a full layer; rows the adapter leaves out get no magnitude."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=1, n_embd=64, n_head=4, n_query_groups=2))
    apply_dora(model, DoRAArgs(r=4, alpha=8, targets=["query", "value", "mlp"]))
    randomize(model)
    qkv = model.transformer.h[0].attn.qkv
    q, k, v = model.config.qkv_sizes
    assert qkv.lora_magnitude.shape == (q + v,)
    for layer in (qkv, model.transformer.h[0].mlp.fc_1):
        direct = torch.linalg.norm(layer.weight + layer.delta_weight(), dim=1)
        direct = torch.cat([direct[s:e] for s, e in layer.parts])
        torch.testing.assert_close(layer.weight_norm(), direct, atol=1e-5, rtol=1e-5)
    scale = qkv.row_scale()
    assert torch.equal(scale[q:q + k], torch.ones(k))  # key rows pass through unchanged
    # the cached ||W_r||^2 follows the weight: a changed base gives new norms
    with torch.no_grad():
        qkv.weight.mul_(2)
    direct = torch.linalg.norm(qkv.weight + qkv.delta_weight(), dim=1)
    torch.testing.assert_close(qkv.weight_norm(), torch.cat([direct[:q], direct[q + k:]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,targets", [
    ("llama-gqa", ["query", "key", "value", "projection", "mlp", "head"]),
    ("qwen2-qkv-bias", ["query", "value", "mlp"]),  # biased q/k/v: the bias stays outside the rescaling
])
def test_same_logits_step_and_count_as_peft(tmp_path, name, targets):
    """Same weights -> same logits (eval), one SGD step -> the same adapter tensors, same trainable count."""
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = DoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets)
    trainable = apply_dora(ours, args)
    randomize(ours)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.PeftModel.from_pretrained(hf, out, is_trainable=True).eval()
    params = dict(ours.named_parameters())
    n_ours = sum(params[n].numel() for n in trainable)
    assert n_ours == pm.get_nb_trainable_parameters()[0]
    assert estimate(ours.config, "dora", args)["trainable_params"] == n_ours
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx), atol=1e-5, rtol=0)
    for model, logits in ((ours, lambda: ours(idx[:, :-1])), (pm, lambda: pm(idx[:, :-1]).logits)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.nn.functional.cross_entropy(logits().flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
    export_peft(ours, tmp_path / "stepped", str(base), args)
    pm.save_pretrained(tmp_path / "peft_stepped")
    mine, theirs = load_file(tmp_path / "stepped" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft_stepped" / "adapter_model.safetensors")
    before = load_file(out / "adapter_model.safetensors")
    assert set(mine) <= set(theirs)
    for k in mine:
        assert not torch.equal(mine[k], before[k]), f"{k} did not move"
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=0, msg=k)


def test_training_forward_with_dropout_equals_peft(tmp_path, monkeypatch):
    """With dropout on, PEFT runs the dropped input through W too (W x + b + (g - 1) W x' + g s B A x'); with the same
    seed both draw the same masks when every adapted layer calls dropout once in the same order (o_proj, then
    gate/up/down) and both draw them with torch's bernoulli (leantune's own CPU masks come from 16-bit lanes of random
    words, ops.dropout, so its masks are swapped for F.dropout's here: the formula is what is compared)."""
    from leantune.models import ops

    monkeypatch.setattr(ops, "dropout", lambda x, p, training=True: torch.nn.functional.dropout(x, p, training))
    base = make_hf("llama-gqa", tmp_path)
    ours = load_hf_checkpoint(base)
    args = DoRAArgs(r=4, alpha=8, dropout=0.3, targets=["projection", "mlp"])
    apply_dora(ours, args)
    randomize(ours)
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.PeftModel.from_pretrained(hf, out, is_trainable=True)
    idx = torch.randint(0, V, (2, 16))
    ours.train(), pm.train()
    torch.manual_seed(5)
    expected = pm(idx).logits
    torch.manual_seed(5)
    actual = ours(idx)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(idx), actual, atol=1e-3)  # the dropout really dropped


@pytest.mark.parametrize("name,targets", [
    ("pythia-partial-rotary", ["query", "value", "mlp", "head"]),  # fused HF qkv grouped per head, partly adapted
    ("gpt2", ["key", "value", "projection"]),  # fused blocked c_attn, Conv1D (fan_in_fan_out)
    ("phi-2", ["query", "value", "projection", "mlp"]),
])
def test_export_loads_in_peft_with_same_logits(tmp_path, name, targets):
    base = make_hf(name, tmp_path)
    ours = load_hf_checkpoint(base).eval()
    args = DoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets)
    apply_dora(ours, args)
    randomize(ours)
    idx = torch.randint(0, V, (2, 16))
    out = export_peft(ours, tmp_path / "peft", str(base), args)
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,target_modules", [
    ("llama-gqa", ["q_proj", "v_proj", "up_proj", "lm_head"]),  # gate/down get the identity (B = 0, m = norm)
    ("pythia-partial-rotary", ["query_key_value", "dense"]),
])
def test_peft_dora_folder_imports_exactly(tmp_path, name, target_modules):
    base = make_hf(name, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=target_modules, use_dora=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    pm.eval().save_pretrained(tmp_path / "peft")
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = pm(idx).logits
    ours = load_hf_checkpoint(base).eval()
    trainable = import_peft(ours, tmp_path / "peft")
    assert any(n.endswith(".lora_magnitude") for n in trainable)
    manifest = load_any_adapter(other := load_hf_checkpoint(base).eval(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(other(idx), expected, atol=1e-5, rtol=0)
    assert manifest["method_args"]["r"] == 4
    assert manifest["method"] == "dora"  # a LORA folder with use_dora resumes as dora (--resume_adapter)


def test_merge_equals_unmerged_unmerge_restores_and_transformers_loads_it(tmp_path):
    base = make_hf("llama-gqa", tmp_path)
    model = load_hf_checkpoint(base).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_dora(model, DoRAArgs(r=4, alpha=8, dropout=0.0, targets="all"))
    randomize(model)
    idx = torch.randint(0, V, (2, 16))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        unmerged = model(idx)
        for m in layers:
            m.merge()
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
        for m in layers:
            m.unmerge()
        for k, v in model.state_dict().items():
            if k in weights:
                torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
        # W + dW - dW is W to rounding; through the model that reaches ~1e-6 (1.01e-6 seen on one CPU): the
        # merge tolerance, 1e-5
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
        get_method("dora").merge(model, 1.0)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
    save_hf_checkpoint(model, tmp_path / "merged", source_dir=base)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, unmerged, atol=1e-5, rtol=0)


def test_quantized_base_equals_its_dequantized_weights():
    """On a 4-bit base the norm uses the dequantized weight: outputs, norms and the merge equal DoRA on the float
    weights the quantized base computes with."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=V, block_size=32, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, bias=True)
    sd = GPT(cfg).state_dict()
    q, f = GPT(cfg), GPT(cfg)
    q.load_state_dict(sd), f.load_state_dict(sd)
    q = quantize_model(q, "bnb.nf4", torch.float32)
    f = dequantize_model(quantize_model(f, "bnb.nf4", torch.float32))
    args = DoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value", "mlp"])
    for m in (q, f):
        torch.manual_seed(3)  # the same A in both
        apply_dora(m, args)
        randomize(m.eval())
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        expected = f(idx)
        torch.testing.assert_close(q(idx), expected, atol=1e-5, rtol=1e-5)
        merge_lora(q)
        torch.testing.assert_close(q(idx), expected, atol=1e-5, rtol=1e-5)


def test_args_flags_and_counts_on_the_meta_device():
    assert DoRAArgs().targets == ["query", "value"] and DoRAArgs().scaling == 2.0
    with pytest.raises(ValueError, match="--dora.r"):
        DoRAArgs(r=0)
    with torch.device("meta"):  # estimate's path: no weights, no norms
        model = GPT(config_from_hf(TINY["llama-gqa"]().to_dict()))
    names = apply_dora(model, DoRAArgs(r=4, targets="all"))
    c = model.config
    q, k, v = c.qkv_sizes
    mags = sum(p.numel() for n, p in model.named_parameters() if n in names and n.endswith("lora_magnitude"))
    assert mags == c.n_layer * (q + k + v + c.n_embd + 2 * c.intermediate_size + c.n_embd) + c.padded_vocab_size
    assert squared_row_norms(torch.ones(3, 4)).tolist() == [4.0, 4.0, 4.0]


def test_weighted_merge_moves_that_fraction_of_the_way():
    """merge(model, w) gives W + w (diag(m / norm) (W + s B A) - W): 0 keeps the base, 1 is the full DoRA merge, so
    DoRA combines with other adapters in `merge --weights`."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=V, block_size=32, n_layer=1, n_embd=64, n_head=4, n_query_groups=2)
    merged = {}
    for w in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        model = GPT(cfg)
        apply_dora(model, DoRAArgs(r=4, dropout=0.0, targets=["key", "mlp"]))
        randomize(model)
        merged[w] = merge_lora(model, w).state_dict()
    for k in merged[0.0]:
        torch.testing.assert_close(merged[0.5][k], (merged[0.0][k] + merged[1.0][k]) / 2, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    assert all(torch.equal(v, merged[0.0][k]) for k, v in GPT(cfg).state_dict().items())
