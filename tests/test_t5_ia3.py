"""IA3 on T5 against peft's IA3 on transformers' T5ForConditionalGeneration: the default targets and trainable counts
equal peft's (tiny models and flan-t5-base on the meta device), the same vectors give the same logits (fp32), PEFT
folders load both ways, and merging folds the vectors without changing the outputs."""

import peft
import pytest
import torch
import transformers as tf
from peft.utils import constants as peft_constants
from t5_support import V, padded_batch, random_t5_hf, tiny_config

from leantune.checkpoint.t5_hf import hf_name, load_t5_checkpoint
from leantune.estimate import estimate_t5
from leantune.methods import apply_method, get_method, load_any_adapter
from leantune.models.t5.model import T5, T5Config
from leantune.peft.ia3 import IA3Args, IA3Linear, merge_ia3

# our args -> peft's IA3Config for the same layers (None: peft's T5 default, k, v and wo with wo input-scaled)
CASES = {
    "default": (IA3Args(), None),
    "all": (IA3Args(targets="all", feedforward="projection,mlp"),
            dict(target_modules=["q", "k", "v", "o", "wo"], feedforward_modules=["o", "wo"])),
    "outputs": (IA3Args(targets="query,projection,mlp", feedforward="none"),
                dict(target_modules=["q", "o", "wo"], feedforward_modules=[])),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _peft_config(case: str) -> peft.IA3Config:
    return peft.IA3Config(task_type="SEQ_2_SEQ_LM", **(CASES[case][1] or {}))


def _randomize(named_params, seed: int) -> None:
    """Vectors away from ones, so every adapted layer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _batch():
    ids, mask = padded_batch()
    dec = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(5))
    return ids, mask, dec


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_default_targets_are_peft_t5_defaults():
    """peft's T5 mapping (k, v, wo; wo a feedforward module) is what our default IA3Args selects."""
    assert peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["t5"] == ["k", "v", "wo"]
    assert peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["t5"] == ["wo"]
    with torch.device("meta"):
        ours = T5(T5Config.from_hf(tiny_config("v1.1").to_dict()))
    apply_method(ours, "ia3", IA3Args())
    layers = {hf_name(n): m.feedforward for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    with torch.device("meta"):
        pm = peft.get_peft_model(tf.T5ForConditionalGeneration(tiny_config("v1.1")), _peft_config("default"))
    theirs = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.ia3.Linear)}
    assert layers == theirs and len(layers) == 2 * (2 + 3 * 2) + (2 + 3)  # k, v of 8 attentions; wo of 5 blocks
    assert sum(layers.values()) == 5


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("case", list(CASES))
def test_trainable_count_equals_peft_tiny(variant, case):
    hf_cfg = tiny_config(variant)
    with torch.device("meta"):
        ours = T5(T5Config.from_hf(hf_cfg.to_dict()))
        pm = peft.get_peft_model(tf.T5ForConditionalGeneration(hf_cfg), _peft_config(case))
    apply_method(ours, "ia3", CASES[case][0])
    theirs, _ = pm.get_nb_trainable_parameters()
    assert _count(ours) == theirs > 0


def test_flan_t5_base_trainable_count_equals_peft_and_estimate():
    """flan-t5-base, defaults: 36 attentions x (k 768 + v 768) + 24 feed-forwards x wo input 2048 = 104,448."""
    cfg = T5Config.from_name("flan-t5-base")
    with torch.device("meta"):
        ours = T5(cfg)
        hf = tf.T5ForConditionalGeneration(tf.T5Config(**cfg.to_hf()))
    apply_method(ours, "ia3", IA3Args())
    theirs, _ = peft.get_peft_model(hf, peft.IA3Config(task_type="SEQ_2_SEQ_LM")).get_nb_trainable_parameters()
    assert _count(ours) == theirs == 36 * 2 * 768 + 24 * 2048
    assert estimate_t5(cfg, "ia3", None, "32-true")["trainable_params"] == theirs


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_vectors_give_peft_logits(tmp_path, variant, case):
    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    pm = peft.get_peft_model(ref, _peft_config(case)).eval()
    _randomize(pm.named_parameters(), seed=3)
    ours = load_t5_checkpoint(folder)
    apply_method(ours, "ia3", CASES[case][0])
    peft_named = dict(pm.named_modules())
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert len(layers) == sum(isinstance(m, peft.tuners.ia3.Linear) for m in peft_named.values()) > 0
    with torch.no_grad():
        for name, layer in layers.items():
            src = peft_named[f"base_model.model.{hf_name(name)}"]
            assert src.is_feedforward == layer.feedforward
            layer.ia3_l.copy_(src.ia3_l["default"].flatten())
    ids, mask, dec = _batch()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, dec, attention_mask=mask)
        base_out = load_t5_checkpoint(folder)(ids, dec, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base_out).abs().max() > 1e-3  # the vectors changed the output


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("case", ["default", "all"])
def test_peft_folders_both_ways(tmp_path, variant, case):
    """Ours -> PEFT folder -> PeftModel.from_pretrained on T5ForConditionalGeneration: equal logits; a folder the
    real peft library saved (non-one vectors) -> load_any_adapter: equal logits and our args."""
    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    args = CASES[case][0]
    ours = load_t5_checkpoint(folder)
    apply_method(ours, "ia3", args)
    _randomize(ours.named_parameters(), seed=4)
    ids, mask, dec = _batch()
    exported = get_method("ia3").peft.export(ours, tmp_path / "ours-peft", str(folder), args)
    loaded = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(folder), exported).eval()
    assert loaded.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    with torch.no_grad():
        want = ours(ids, dec, attention_mask=mask)
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want,
                                   atol=1e-5, rtol=0)

    made = peft.get_peft_model(ref, _peft_config(case))
    _randomize(made.named_parameters(), seed=6)
    made.eval().save_pretrained(tmp_path / "made-by-peft")
    again = load_t5_checkpoint(folder)
    manifest = load_any_adapter(again, tmp_path / "made-by-peft")
    assert manifest["method"] == "ia3"
    assert manifest["method_args"] == {"targets": args.targets, "feedforward": args.feedforward}
    assert not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        want = made(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = again(ids, dec, attention_mask=mask)
        base_out = load_t5_checkpoint(folder)(ids, dec, attention_mask=mask)  # `ref` now carries peft's layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base_out).abs().max() > 1e-3


def test_peft_folder_with_layers_left_out_keeps_ones_there(tmp_path):
    """A folder adapting some of a target's modules (a regex target: the decoder's keys only) imports as that
    target with ones (the identity) on the modules it leaves out."""
    ref, folder = random_t5_hf("v1.1", tmp_path / "t5", noise=0.5)
    made = peft.get_peft_model(ref, peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=r".*decoder.*\.k$",
                                                   feedforward_modules=[]))
    _randomize(made.named_parameters(), seed=7)
    made.eval().save_pretrained(tmp_path / "made-by-peft")
    ours = load_t5_checkpoint(folder)
    assert load_any_adapter(ours, tmp_path / "made-by-peft")["method_args"]["targets"] == ["key"]
    assert torch.equal(ours.encoder.block[0].attn.k.ia3_l, torch.ones(32))
    ids, mask, dec = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, dec, attention_mask=mask),
                                   made(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("modules,message", [
    (dict(target_modules=["wi_1"], feedforward_modules=[]), "no leantune target"),  # mt5's default
    (dict(target_modules=["k", "wo"], feedforward_modules=["k", "wo"]), "feedforward module"),
])
def test_peft_folder_without_leantune_equivalent_is_refused(tmp_path, modules, message):
    ref, folder = random_t5_hf("v1.1", tmp_path / "t5", noise=0.5)
    peft.get_peft_model(ref, peft.IA3Config(task_type="SEQ_2_SEQ_LM", **modules)).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=message):
        load_any_adapter(load_t5_checkpoint(folder), tmp_path / "p")


# fp64: the fold is exact up to fp64 rounding; fp32: these noise-0.5 random weights amplify the reordered rounding
# to ~1.5e-4 on logits of ~4 (the same weights at noise 0.2: ~3e-5)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-4}


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("case", ["default", "all"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_merge_equals_unmerged_and_unmerge_restores(tmp_path, variant, case, dtype):
    _, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    model = load_t5_checkpoint(folder).to(dtype)
    apply_method(model, "ia3", CASES[case][0])
    _randomize(model.named_parameters(), seed=8)
    ids, mask, dec = _batch()
    layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
    weights = [m.weight.detach().clone() for m in layers]
    tol = TOLERANCE[dtype]
    with torch.no_grad():
        unmerged = model(ids, dec, attention_mask=mask)
        assert unmerged.dtype == dtype
        for m in layers:
            m.merge()
        torch.testing.assert_close(model(ids, dec, attention_mask=mask), unmerged, atol=tol, rtol=0)
        for m in layers:
            m.unmerge()
        for m, w in zip(layers, weights, strict=True):
            torch.testing.assert_close(m.weight, w, atol=tol, rtol=1e-6)
        torch.testing.assert_close(model(ids, dec, attention_mask=mask), unmerged, atol=tol, rtol=0)
        merge_ia3(model)
        assert not any(isinstance(m, IA3Linear) for m in model.modules())
        assert type(model.decoder.block[0].ff.wo) is torch.nn.Linear
        merged = model(ids, dec, attention_mask=mask)
        base = load_t5_checkpoint(folder).to(dtype)(ids, dec, attention_mask=mask)
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=0)
    assert (merged - base).abs().max() > 1e-3  # the merge folded the vectors in
