"""Prompt tuning and P-tuning on T5 against peft's on T5ForConditionalGeneration (SEQ_2_SEQ_LM): the virtual
embeddings prepended to the encoder input give the same logits (fp32), PEFT folders both ways, cached greedy
decoding equal to recompute, and prefix tuning refused with a clear message."""

import peft
import pytest
import torch
from t5_support import padded_batch, random_t5_hf

from leantune.checkpoint.t5_hf import load_t5_checkpoint
from leantune.decode.seq2seq import t5_generate
from leantune.methods import apply_method, get_method, load_any_adapter
from leantune.peft.p_tuning import PTuningArgs
from leantune.peft.prompt_tuning import PromptTuningArgs

P = 4
CASES = [
    ("prompt_tuning", PromptTuningArgs(num_virtual_tokens=P, init="random"),
     lambda: peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)),
    ("p_tuning", PTuningArgs(num_virtual_tokens=P, encoder_hidden_size=16),
     lambda: peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, encoder_hidden_size=16)),
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def twins(tmp_path, variant, method, args, peft_config):
    ref, folder = random_t5_hf(variant, tmp_path / "t5", noise=0.5)
    pm = peft.get_peft_model(ref, peft_config()).eval()
    ours = load_t5_checkpoint(folder)
    apply_method(ours, method, args)
    theirs = {k.split("prompt_encoder.default.")[1]: v for k, v in pm.named_parameters() if "prompt_encoder" in k}
    with torch.no_grad():
        for k, p in ours.virtual.named_parameters():
            v = theirs[k]
            v.add_(torch.randn_like(v) * 0.3)
            # peft's seq2seq table has 2P rows (encoder and decoder); only the first P are ever read
            p.copy_(v[:P] if k == "embedding.weight" else v)
    return pm, ours.eval(), folder


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@pytest.mark.parametrize("method,args,peft_config", CASES, ids=[c[0] for c in CASES])
def test_logits_and_peft_folders_equal_peft(tmp_path, variant, method, args, peft_config):
    pm, ours, folder = twins(tmp_path, variant, method, args, peft_config)
    ids, mask = padded_batch()
    dec = torch.randint(0, 96, (ids.shape[0], 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, dec, attention_mask=mask), want, atol=1e-5, rtol=0)
    out = get_method(method).peft.export(ours, tmp_path / "ours-peft", str(folder), args)
    import transformers as tf

    loaded = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(folder), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want,
                                   atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path / "made-by-peft")
    again = load_t5_checkpoint(folder)
    assert load_any_adapter(again, tmp_path / "made-by-peft")["method"] == method
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, dec, attention_mask=mask), want, atol=1e-5, rtol=0)


def test_cached_decoding_equals_recompute_and_prefix_tuning_is_refused(tmp_path):
    _, ours, folder = twins(tmp_path, "v1.1", *CASES[0])
    ids, mask = padded_batch()
    cached = t5_generate(ours, ids, mask, max_new_tokens=6, eos_ids=[], min_new_tokens=6)
    assert torch.equal(cached, t5_generate(ours, ids, mask, max_new_tokens=6, eos_ids=[], min_new_tokens=6,
                                           use_cache=False))
    with pytest.raises(ValueError, match="finetune prefix_tuning is not available for encoder-decoder models"):
        apply_method(load_t5_checkpoint(folder), "prefix_tuning", None)
