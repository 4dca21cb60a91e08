"""T5 tokenizers through `leantune.tokenizer.Tokenizer`, against transformers' T5Tokenizer on a tiny Unigram
sentencepiece model trained here (pad 0, EOS 1, unk 2, no BOS, sentinel tokens <extra_id_N> after the vocabulary:
T5's layout).

A tokenizer.json folder works today when the caller asks for the EOS that T5 appends to every input (eos=True).
A folder with only `spiece.model` (the file name T5 repos use) does not load yet: the strict xfail below turns into
a failure once leantune/tokenizer.py reads it, as a reminder to drop the mark."""

import io
import json

import pytest
import sentencepiece as spm
import transformers as tf

from leantune.tokenizer import Tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog.", "summarize: studies have shown that owning a dog is good",
        "translate English to German: That is good.", "Flan-T5 answers questions; it was fine-tuned on tasks!",
        "numbers 123 456 and émigré café naïve"] * 20
SAMPLES = ["summarize: the dog is good <extra_id_0> for you", "translate English to German: café 123",
           "<extra_id_1> the lazy fox <extra_id_0>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(folder with spiece.model + tokenizer_config.json, transformers' save_pretrained folder, transformers'
    tokenizer)."""
    root = tmp_path_factory.mktemp("t5tok")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=model, vocab_size=70,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
    sp_dir = root / "spiece"
    sp_dir.mkdir()
    (sp_dir / "spiece.model").write_bytes(model.getvalue())
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 4}))
    ref = tf.T5Tokenizer.from_pretrained(sp_dir)
    ref.save_pretrained(root / "json")
    return sp_dir, root / "json", ref


def test_tokenizer_json_encodes_and_decodes_like_transformers(folders):
    _, json_dir, ref = folders
    tok = Tokenizer(json_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.use_bos) == (None, 1, 0, False)
    assert tok.vocab_size == len(ref)
    for text in SAMPLES:
        want = ref(text).input_ids
        assert want[-1] == 1 and tok.encode(text) == want[:-1]  # T5 appends </s>: leantune only when asked
        assert tok.encode(text, eos=True) == want
        assert tok.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True)


@pytest.mark.xfail(strict=True, raises=FileNotFoundError,
                   reason="leantune.tokenizer looks for tokenizer.model, not T5's spiece.model")
def test_spiece_model_folder_encodes_like_transformers(folders):
    sp_dir, _, ref = folders
    tok = Tokenizer(sp_dir)
    for text in SAMPLES:
        assert tok.encode(text, eos=True) == ref(text).input_ids
