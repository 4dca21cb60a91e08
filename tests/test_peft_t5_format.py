"""PEFT's folder format on T5 for every LoRA-family method, against the real peft library on transformers'
T5ForConditionalGeneration: `export --format peft` of a leantune adapter loads in `PeftModel.from_pretrained` with our
logits and imports back; a folder peft itself saved imports with peft's logits. (LoRA and IA3 on T5 have their own
suites too: tests/test_t5_lora.py, tests/test_t5_ia3.py.)

Logits are compared in float64, where an exact translation agrees to rounding (in fp32 these noise-0.5 weights differ
by ~1e-4: the methods fold W + dW in another order than peft); DoRA, whose row norms leantune accumulates in fp32
only, in float32 on gentler weights (noise 0.2), where that rounding stays below 1e-4."""

import dataclasses
import json
import warnings

import peft
import pytest
import torch
import transformers as tf
from t5_support import V, padded_batch, random_t5_hf

from leantune.checkpoint.t5_hf import load_t5_checkpoint
from leantune.commands.export import export as export_command
from leantune.methods import apply_method, build_manifest, get_method, load_any_adapter, save_checkpoint
from leantune.models import kinds
from leantune.peft.adalora_layers import adalora_layers
from leantune.peft.peft_format import target_modules

ALL = ["query", "key", "value", "projection", "mlp", "head"]
ADALORA_SCHEDULE = dict(tinit=1, tfinal=2, deltaT=1, total_step=8)
# method -> (leantune args, peft config for the same layers: "{ff}" stands for the variant's feed-forward linears)
CASES = {
    "lora": (dict(r=4, alpha=8, dropout=0.0, targets=ALL), None),
    "qlora": (dict(r=4, alpha=8, dropout=0.0, targets=["query", "value"]), None),
    "ia3": (dict(targets="all", feedforward="mlp"), None),
    "dora": (dict(r=4, alpha=8, dropout=0.0, targets=ALL),
             lambda mods: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=mods)),
    "adalora": (dict(init_r=4, target_r=2, alpha=8, dropout=0.0, targets=["query", "key", "value", "projection", "mlp"]),
                lambda mods: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=[m for m in mods if m != "lm_head"], **ADALORA_SCHEDULE)),
    "loha": (dict(r=2, alpha=4, targets=ALL), lambda mods: peft.LoHaConfig(r=2, alpha=4, target_modules=mods)),
    "lokr": (dict(r=2, alpha=4, targets=ALL), lambda mods: peft.LoKrConfig(r=2, alpha=4, target_modules=mods)),
}


def _precision(method):
    """(dtype, atol) logits are compared in, and the noise of the random T5 weights."""
    return (torch.float32, 1e-4, 0.2) if method == "dora" else (torch.float64, 1e-9, 0.5)


class _Tok:
    """The three fields build_manifest reads from a tokenizer."""

    bos_id, eos_ids, pad_id = None, [1], 0


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _batch():
    """Encoder ids and mask, decoder ids."""
    ids, mask = padded_batch()
    return ids, mask, torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(5))


def _randomize(named, seed):
    """Every trainable tensor moved off its init (B, w2_b, E, lokr_w1 start at zero; IA3 at ones)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in named:
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def _leantune_adapter(folder, out, method):
    """A leantune adapter folder on the T5 at `folder` (random non-zero tensors, AdaLoRA with some ranks pruned) and
    the model it was taken from, in eval mode."""
    model = load_t5_checkpoint(folder)
    m = get_method(method)
    args = m.make_args(CASES[method][0])
    trainable = apply_method(model, m, args)
    _randomize(model.named_parameters(), seed=3)
    with torch.no_grad():
        for layer in adalora_layers(model):
            layer.lora_E[::3] = 0  # pruned triplets: the folder's rank_pattern says which
    manifest = build_manifest(method, args, folder, _Tok(), None, "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, method, trainable, manifest, folder)
    return model.to(_precision(method)[0]).eval()


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("method", list(CASES))
def test_export_command_loads_in_peft_and_imports_back(tmp_path, variant, method):
    """The folder `export --format peft` writes for a T5 adapter (AdaLoRA's crashed on T5's config before) loads on
    T5ForConditionalGeneration with our logits, and reads back into leantune as the same method and logits."""
    _, folder = random_t5_hf(variant, tmp_path / "t5", noise=_precision(method)[2])
    ours = _leantune_adapter(folder, tmp_path / "adapter", method)
    out = export_command(adapter=tmp_path / "adapter", checkpoint_dir=folder, format="peft", out_dir=tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["peft_type"] == get_method(method).peft.peft_type
    if method == "adalora":
        assert cfg["rank_pattern"] and all(sum(keep) < 4 for keep in cfg["rank_pattern"].values())
    ids, mask, dec = _batch()
    dtype, atol, _ = _precision(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about AdaLoRA's r and tied heads
        loaded = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(folder), out)
    with torch.no_grad():
        want = ours(ids, dec, attention_mask=mask)
        base = load_t5_checkpoint(folder).to(dtype).eval()(ids, dec, attention_mask=mask)
        assert (want - base).abs().max() > 1e-2  # the adapter changes the output
        got = loaded.to(dtype).eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    back = load_t5_checkpoint(folder)
    manifest = load_any_adapter(back, out)
    assert manifest["method"] == get_method(method).kind  # qlora's folder is a LoRA folder
    with torch.no_grad():
        torch.testing.assert_close(back.to(dtype).eval()(ids, dec, attention_mask=mask), want, atol=atol, rtol=0)


def _peft_modules(variant):
    ff = ["wi", "wo"] if variant == "v1.0" else ["wi_0", "wi_1", "wo"]
    return ["q", "k", "v", "o", *ff, "lm_head"]


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("method", [m for m, (_, config) in CASES.items() if config is not None])
def test_folder_saved_by_peft_imports_with_its_logits(tmp_path, variant, method):
    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=_precision(method)[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(ref, CASES[method][1](_peft_modules(variant)))
    _randomize(made.named_parameters(), seed=7)
    made.eval().save_pretrained(tmp_path / "made-by-peft")
    ours = load_t5_checkpoint(folder)
    manifest = load_any_adapter(ours, tmp_path / "made-by-peft")
    assert manifest["method"] == method
    assert manifest["method_args"]["targets"] == CASES[method][0]["targets"]
    ids, mask, dec = _batch()
    dtype, atol, _ = _precision(method)
    with torch.no_grad():
        want = made.to(dtype)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours.to(dtype).eval()(ids, dec, attention_mask=mask), want, atol=atol, rtol=0)


def test_folder_for_a_deeper_t5_is_refused_naming_the_fix(tmp_path):
    _, folder = random_t5_hf("v1.1", tmp_path / "t5", noise=0.5)
    _leantune_adapter(folder, tmp_path / "adapter", "loha")
    out = export_command(adapter=tmp_path / "adapter", checkpoint_dir=folder, format="peft", out_dir=tmp_path / "peft")
    _, shallow = random_t5_hf("v1.1", tmp_path / "shallow", noise=0.5, num_decoder_layers=2)
    with pytest.raises(ValueError, match=r"decoder\.block\.2\..*pass the --checkpoint_dir the adapter was trained on"):
        load_any_adapter(load_t5_checkpoint(shallow), out)


def test_a_kind_without_a_peft_layout_is_refused_naming_method_and_kind(tmp_path, monkeypatch):
    _, folder = random_t5_hf("v1.1", tmp_path / "t5", noise=0.5)
    model = load_t5_checkpoint(folder)
    m = get_method("loha")
    apply_method(model, m, CASES["loha"][0])
    monkeypatch.setattr(kinds, "KINDS", (dataclasses.replace(kinds.T5_KIND, peft=None), kinds.DECODER))
    with pytest.raises(ValueError, match="PEFT has no layout for LOHA on encoder-decoder models"):
        m.peft.export(model, tmp_path / "out", str(folder), m.make_args(CASES["loha"][0]))
    assert not (tmp_path / "out").exists()


def test_target_modules_name_only_the_adapted_modules():
    """PEFT matches target_modules as suffixes: a name is as short as it can be without selecting a module the
    adapter leaves out or one of another mode (IA3's feedforward_modules)."""
    every = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    picked = {p: None for p in every if p.endswith(("attn.c_proj", "c_attn"))}
    assert set(target_modules(picked, every).values()) == {"attn.c_proj", "c_attn"}
    picked = {p: p.endswith("mlp.c_proj") for p in every if p.endswith("c_proj")}
    assert set(target_modules(picked, every).values()) == {"attn.c_proj", "mlp.c_proj"}
    picked = {p: None for p in every if p.endswith("c_proj") and ".0." in p}
    assert set(target_modules(picked, every).values()) == {"0.attn.c_proj", "0.mlp.c_proj"}  # not h.10's
    picked = {p: None for p in every}
    assert set(target_modules(picked, every).values()) == {"c_attn", "c_proj", "c_fc"}
