"""T5 tokenizers through `leantune.tokenizer.Tokenizer`, against transformers' T5Tokenizer on a tiny Unigram
sentencepiece model trained here (pad 0, EOS 1, unk 2, no BOS, sentinel tokens <extra_id_N> after the vocabulary:
T5's layout).

Every folder kind a T5 repo can come as: only `spiece.model` (T5 recognised by the file name), spiece.model with
config.json (model type) or with tokenizer_config.json (class, extra_ids, or the transformers-4 `added_tokens_decoder`
flan-t5 ships), and transformers' tokenizer.json. Each must encode (EOS appended by default, as T5 does), decode
(with and without special tokens, random id sequences included) and count its vocabulary like transformers."""

import io
import json
import random

import pytest
import sentencepiece as spm
import transformers as tf

from leantune.tokenizer import Tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog.", "summarize: studies have shown that owning a dog is good",
        "translate English to German: That is good.", "Flan-T5 answers questions; it was fine-tuned on tasks!",
        "numbers 123 456 and émigré café naïve"] * 20
SAMPLES = ["summarize: the dog is good <extra_id_0> for you", "translate English to German: café 123",
           "<extra_id_1> the lazy fox <extra_id_0>", "foo<extra_id_0>bar<extra_id_3>", "  lead  and   many spaces  ",
           "line\nnext\ttab", "unseen ß 日本 ƒ glyphs!!", "</s> eos, <pad> and <unk> in the text", "", " ",
           "<extra_id_100> is no sentinel", "émigré naïve x </s>"]


def _flan_config(n: int, sp_size: int) -> dict:
    """tokenizer_config.json as flan-t5 ships it (transformers 4): sentinels listed as additional special tokens and
    every added token with its id in `added_tokens_decoder`."""
    sentinel = {sp_size + n - 1 - i: f"<extra_id_{i}>" for i in range(n)}
    added = {str(tid): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for tid, s in {0: "<pad>", 1: "</s>", 2: "<unk>", **sentinel}.items()}
    return {"additional_special_tokens": [f"<extra_id_{i}>" for i in range(n)], "eos_token": "</s>", "extra_ids": n,
            "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer", "model_max_length": 512,
            "added_tokens_decoder": added}


@pytest.fixture(scope="module")
def model_bytes():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=model, vocab_size=70,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
    return model.getvalue()


# folder kind -> (files besides spiece.model, extra_ids transformers reads)
KINDS = {
    "spiece only": ({}, 100),
    "spiece + config.json": ({"config.json": {"model_type": "t5", "pad_token_id": 0, "eos_token_id": 1,
                                              "decoder_start_token_id": 0}}, 100),
    "spiece + tokenizer_config extra_ids": ({"tokenizer_config.json": {"tokenizer_class": "T5Tokenizer",
                                                                       "extra_ids": 4}}, 4),
    "spiece + flan-t5 tokenizer_config": ({"tokenizer_config.json": _flan_config(7, 70)}, 7),
}


@pytest.fixture(scope="module", params=[*KINDS, "tokenizer.json"])
def folder(request, tmp_path_factory, model_bytes):
    """(folder, transformers' tokenizer for it, number of sentinels). The tokenizer.json folder is transformers'
    save_pretrained of the spiece.model-only one (tokenizer.json + tokenizer_config.json, no spiece.model)."""
    root = tmp_path_factory.mktemp("t5tok")
    kind = request.param
    files, n_extra = KINDS.get(kind, KINDS["spiece only"])
    sp_dir = root / "spiece"
    sp_dir.mkdir()
    (sp_dir / "spiece.model").write_bytes(model_bytes)
    for name, content in files.items():
        (sp_dir / name).write_text(json.dumps(content))
    ref = tf.T5Tokenizer.from_pretrained(sp_dir)
    if kind != "tokenizer.json":
        return sp_dir, ref, n_extra
    ref.save_pretrained(root / "json")
    assert not (root / "json" / "spiece.model").exists()
    return root / "json", ref, n_extra


def test_special_ids_and_vocabulary(folder):
    d, ref, n_extra = folder
    tok = Tokenizer(d)
    assert tok.backend == ("tokenizers" if (d / "tokenizer.json").is_file() else "sentencepiece")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids, tok.use_bos, tok.use_eos) == (None, 1, 0, [1], False, True)
    assert (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id) == (0, 1, 2)
    assert tok.token_to_id("<unk>") == 2 and tok.id_to_token(2) == "<unk>"
    assert tok.vocab_size == len(ref) == 70 + n_extra
    sentinels = [f"<extra_id_{i}>" for i in range(n_extra)]
    ids = [tok.token_to_id(s) for s in sentinels]
    assert ids == ref.convert_tokens_to_ids(sentinels) == list(range(len(ref) - 1, 69, -1))  # <extra_id_0> is last
    assert [tok.id_to_token(i) for i in ids] == sentinels
    assert tok.token_to_id(f"<extra_id_{len(sentinels)}>") is None


def test_encode_like_transformers(folder):
    d, ref, _ = folder
    tok = Tokenizer(d)
    for text in SAMPLES:
        want = ref(text).input_ids
        assert want[-1] == 1 and tok.encode(text) == want, text  # T5 appends </s> to every input
        assert tok.encode(text, eos=True) == want
        assert tok.encode(text, eos=False) == ref(text, add_special_tokens=False).input_ids
        assert tok.encode(text, bos=True) == want  # no BOS token: nothing to add
        assert tok.encode(text, max_length=3) == want[:3]  # a plain cut (transformers' truncation keeps the EOS)


def test_decode_like_transformers(folder):
    d, ref, _ = folder
    tok = Tokenizer(d)
    rng = random.Random(0)
    encoded = [ref(text).input_ids for text in SAMPLES]
    # random ids: sentinels, pad/eos/unk and lone "▁" pieces in every position (the spacing rules around specials)
    randoms = [[rng.randrange(len(ref)) for _ in range(rng.randrange(1, 10))] for _ in range(150)]
    space, sentinel = ref.convert_tokens_to_ids(["\u2581", "<extra_id_0>"])
    word = next(i for i in range(len(ref)) if len(ref.convert_ids_to_tokens(i)) > 1 and
                ref.convert_ids_to_tokens(i).startswith("\u2581"))  # a word piece with its space
    spaced = [[space, space, word], [space, word, sentinel, space, word], [0, space, word, 1],
              [sentinel, word, 2, word]]
    for ids in encoded + spaced + randoms:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_stream_decode_equals_full_decode(folder):
    d, _, _ = folder
    tok = Tokenizer(d)
    ids = [0, *tok.encode("summarize: the <extra_id_0> dog is<extra_id_1> good <extra_id_0>café <pad> x")]
    for skip in (False, True):
        dec = tok.stream_decoder(skip_special_tokens=skip)
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)


def test_add_eos_token_in_config_wins(tmp_path, model_bytes):
    (tmp_path / "spiece.model").write_bytes(model_bytes)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                                "add_eos_token": False}))
    tok = Tokenizer(tmp_path)
    assert tok.use_eos is False and tok.encode("the dog")[-1] != 1 and tok.encode("the dog", eos=True)[-1] == 1


def test_sentencepiece_named_spiece_of_another_class_is_not_t5(tmp_path, model_bytes):
    """T5's conventions come from the folder, not from every sentencepiece file: a tokenizer_config naming another
    class keeps the plain sentencepiece behaviour (no sentinels, no EOS unless asked)."""
    (tmp_path / "spiece.model").write_bytes(model_bytes)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = Tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    assert (tok.vocab_size, tok.use_eos, tok.token_to_id("<extra_id_0>")) == (70, False, None)
    assert tok.encode("the lazy dog") == sp.encode("the lazy dog")
