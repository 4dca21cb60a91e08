"""LoRA on T5 against peft's LoRA on transformers' T5ForConditionalGeneration: same adapter weights give the same
logits (fp32), and the trainable count for flan-t5-base r=32 q,v equals peft's (both built on the meta device)."""

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from t5_support import padded_batch, random_t5_hf

from leantune.checkpoint.t5_hf import hf_name, load_t5_checkpoint
from leantune.cli import main
from leantune.methods import apply_method
from leantune.models.t5.model import T5, T5Config
from leantune.peft.lora_layers import LoRAArgs, LoRALinear

# our targets -> peft's target_modules for the same layers
CASES = {
    "default": (["query", "value"], ["q", "v"]),
    "all": (["query", "key", "value", "projection", "mlp", "head"], None),
}


def _peft_modules(variant: str, targets: str) -> list[str]:
    if CASES[targets][1] is not None:
        return CASES[targets][1]
    ff = ["wi_0", "wi_1", "wo"] if variant == "v1.1" else ["wi", "wo"]
    return ["q", "k", "v", "o", *ff, "lm_head"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("targets", list(CASES))
def test_lora_logits_equal_peft(tmp_path, variant, targets):
    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM",
                                                target_modules=_peft_modules(variant, targets))).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B != 0: the update shows
    ours = load_t5_checkpoint(folder)
    apply_method(ours, "lora", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=CASES[targets][0]))
    peft_named = dict(peft_model.named_modules())
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    peft_layers = [n for n, m in peft_named.items() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    assert len(layers) == len(peft_layers) > 0
    with torch.no_grad():
        for name, layer in layers.items():
            src = peft_named[f"base_model.model.{hf_name(name)}"]
            layer.lora_A.copy_(src.lora_A["default"].weight)
            layer.lora_B.copy_(src.lora_B["default"].weight)
    ours.eval()
    ids, mask = padded_batch()
    dec = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, dec, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    base_out = T5.forward(load_t5_checkpoint(folder), ids, dec, attention_mask=mask)
    assert (got - base_out).abs().max() > 1e-3  # the adapter changed the output


def flan_t5_base_lora_count() -> tuple[int, int]:
    """(ours, peft's) trainable counts for flan-t5-base, LoRA r=32 alpha=32 dropout 0.05 on q and v, on meta."""
    cfg = T5Config.from_name("flan-t5-base")
    with torch.device("meta"):
        ours = T5(cfg)
        hf = tf.T5ForConditionalGeneration(tf.T5Config(**cfg.to_hf()))
    apply_method(ours, "lora", LoRAArgs(r=32, alpha=32, dropout=0.05))
    mine = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    peft_model = get_peft_model(hf, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, target_modules=["q", "v"],
                                               task_type="SEQ_2_SEQ_LM"))
    theirs = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return mine, theirs


def test_flan_t5_base_trainable_count_equals_peft():
    mine, theirs = flan_t5_base_lora_count()
    assert mine == theirs == 2 * 32 * (768 + 768) * (12 + 2 * 12)  # (q, v) x r (in + out) x 36 attentions


def test_estimate_prints_peft_count_for_flan_t5_base(capsys):
    main(["estimate", "--model", "google/flan-t5-base", "--method", "lora", "--lora.r", "32"])
    _, theirs = flan_t5_base_lora_count()
    assert f"trainable_params   {theirs:,}" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("targets", list(CASES))
def test_peft_folders_both_ways(tmp_path, variant, targets):
    """Ours -> `export --format peft` layout -> PeftModel.from_pretrained on T5ForConditionalGeneration: equal
    logits; a folder the real peft library saved (non-zero B) -> load_any_adapter: equal logits."""
    from peft import PeftModel

    from leantune.methods import get_method, load_any_adapter

    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    args = LoRAArgs(r=4, alpha=8, dropout=0.0, targets=CASES[targets][0])
    ours = load_t5_checkpoint(folder)
    apply_method(ours, "lora", args)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    ours.eval()
    ids, mask = padded_batch()
    dec = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(5))
    exported = get_method("lora").peft.export(ours, tmp_path / "ours-peft", str(folder), args)
    loaded = PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(folder), exported).eval()
    with torch.no_grad():
        want = ours(ids, dec, attention_mask=mask)
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want,
                                   atol=1e-5, rtol=0)
    made = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM",
                                          target_modules=_peft_modules(variant, targets)))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    made.eval().save_pretrained(tmp_path / "made-by-peft")
    again = load_t5_checkpoint(folder)
    manifest = load_any_adapter(again, tmp_path / "made-by-peft")
    assert manifest["method"] == "lora" and manifest["method_args"]["targets"] == CASES[targets][0]
    with torch.no_grad():
        want = made(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(again(ids, dec, attention_mask=mask), want, atol=1e-5, rtol=0)
