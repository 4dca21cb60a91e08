"""Tokenizer: ids, BOS/EOS rules, chat templates and streaming decode, checked against transformers and
sentencepiece as references."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch
from tokenizer_support import llama_sentencepiece_folder

from leantune.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "emoji 😀👍🏽 and CJK 中文字符 and Кириллица",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "  leading and trailing whitespace \t\n\n  ",
    "numbers 3.14159 and 2024-11-23, 1e-5",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer with émoji 😀."},
]


@pytest.fixture(scope="module")
def smol(default_checkpoint):
    return Tokenizer(default_checkpoint)


@pytest.fixture(scope="module")
def hf_smol(default_checkpoint):
    import transformers as tf
    return tf.AutoTokenizer.from_pretrained(default_checkpoint)


# ---- the default model (tokenizer.json) -------------------------------------------------------------------------
@pytest.mark.slow
def test_default_ids_equal_transformers(smol, hf_smol):
    for text in TEXTS:
        ref = hf_smol(text, add_special_tokens=True)["input_ids"]
        assert smol.encode(text) == ref, text  # SmolLM2 adds no BOS: both give the plain ids
        assert smol.encode(text, bos=False) == hf_smol(text, add_special_tokens=False)["input_ids"]
        assert smol.decode(ref) == hf_smol.decode(ref, skip_special_tokens=False) == text
        assert smol.decode(torch.tensor(ref), skip_special_tokens=True) == hf_smol.decode(ref, skip_special_tokens=True)


@pytest.mark.slow
def test_default_special_ids(smol, hf_smol):
    assert smol.vocab_size == len(hf_smol) == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (hf_smol.bos_token_id, hf_smol.eos_token_id, hf_smol.pad_token_id)
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>, <|im_end|>
    assert smol.eos_ids == [2]
    assert smol.use_bos is False
    assert smol.token_to_id("<|im_end|>") == 2 and smol.token_to_id("not-a-token-xyz") is None


@pytest.mark.slow
def test_exactly_one_bos(smol):
    plain = smol.encode("Hi there")
    assert smol.encode("Hi there", bos=True) == [smol.bos_id, *plain]
    # text that already starts with the BOS token never gets a second one
    with_bos_text = smol.encode("<|im_start|>user\nHi", bos=True)
    assert with_bos_text.count(smol.bos_id) == 1 and with_bos_text[0] == smol.bos_id
    assert smol.encode("Hi there", eos=True) == [*plain, smol.eos_id]
    assert smol.encode("Hi there", bos=True, eos=True, max_length=2) == [smol.bos_id, plain[0]]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["system", "no-system"])
def test_default_chat_template_equals_transformers(smol, hf_smol, messages, add_generation_prompt):
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") is add_generation_prompt


@pytest.mark.slow
def test_incremental_decode_equals_full_decode(smol):
    text = "Unicode: 😀👍🏽 中文字符 ñandú — “quotes” \u200b end 🤖"
    ids = smol.encode(text)
    dec, pieces = smol.stream_decoder(), []
    for i in ids:
        piece = dec.push(i)
        assert "\ufffd" not in piece  # never emits half a character
        pieces.append(piece)
    pieces.append(dec.flush())
    assert "".join(pieces) == smol.decode(ids) == text
    assert sum(1 for p in pieces if p) < len(ids)  # some tokens were held back until their character completed


# ---- templates: transformers' jinja environment ------------------------------------------------------------------
def _folder_with_template(tmp_path, default_checkpoint, template):
    d = tmp_path / "tpl"
    d.mkdir()
    shutil.copy(default_checkpoint / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((default_checkpoint / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.slow
def test_template_helpers_match_transformers(tmp_path, default_checkpoint):
    import transformers as tf
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('bad role') }}{% endif %}"
        "{% generation %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}{% endgeneration %}\n"
        "{% if loop.index > 10 %}{% break %}{% endif %}{% endfor %}"
        "{{ messages | tojson }}{{ {'k': 'ü'} | tojson(indent=2) }}{{ eos_token }}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    d = _folder_with_template(tmp_path, default_checkpoint, [{"name": "default", "template": template},
                                                             {"name": "tool_use", "template": "x"}])
    ours, ref = Tokenizer(d), tf.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == template
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.slow
def test_chat_template_jinja_file_and_no_template(tmp_path, default_checkpoint):
    d = _folder_with_template(tmp_path, default_checkpoint, None)
    assert Tokenizer(d).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(d).apply_chat_template(CHAT)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }};{% endfor %}")
    assert Tokenizer(d).apply_chat_template(CHAT[:2]) == "You are terse.;What is 2+2?;"


@pytest.mark.slow
def test_use_bos_from_post_processor_and_config(tmp_path, default_checkpoint):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    d = _folder_with_template(tmp_path, default_checkpoint, None)
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer(d)
    assert t.use_bos is True  # detected from the post-processor...
    assert t.encode("hi") == [1, *t.encode("hi", bos=False)]  # ...and added exactly once
    assert 1 not in t.encode("hi", bos=False)  # off means off, even though the post-processor would add it
    cfg["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(d).use_bos is False  # the config wins, as in transformers


def test_eos_ids_collects_generation_config_and_config(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    d = tmp_path / "t"
    d.mkdir()
    HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<eot>": 2, "<eom>": 3, "a": 4}, unk_token="a")).save(
        str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 0}))
    t = Tokenizer(d)
    assert (t.bos_id, t.eos_id, t.eos_ids, t.pad_id) == (0, 1, [1, 2, 3], None)


def test_missing_tokenizer_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)


# ---- sentencepiece (tokenizer.model) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny Llama-style sentencepiece BPE model (byte fallback, identity normalization) + tokenizer_config."""
    return llama_sentencepiece_folder(tmp_path_factory.mktemp("sp"))


SP_TEXTS = ["hello world", "naïve 😀 中文 unseen ƒ glyphs", "12345 x", "line\nnext\ttab", "Hello", "a  b   c"]


def test_sentencepiece_ids_and_bos_rules(sp_dir):
    t, sp = Tokenizer(sp_dir), spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert t.backend == "sentencepiece" and t.vocab_size == 400
    assert (t.bos_id, t.eos_id, t.eos_ids, t.pad_id, t.use_bos) == (1, 2, [2], None, True)
    for text in SP_TEXTS:
        assert t.encode(text) == [1, *sp.encode(text)], text
        assert t.encode(text, bos=False, eos=True) == [*sp.encode(text), 2]
        assert t.decode(t.encode(text)) == "<s>" + text
        assert t.decode(t.encode(text), skip_special_tokens=True) == text
    # special token strings in the text become their ids, each segment encoded like sentencepiece (Meta's Llama 2
    # reference encodes each turn separately, with its dummy prefix), and the text's BOS is the only BOS.
    text = "<s>[INST] hi [/INST] ok</s><s>[INST] again"
    expected = [1, *sp.encode("[INST] hi [/INST] ok"), 2, 1, *sp.encode("[INST] again")]
    assert t.encode(text) == expected and t.encode(text, bos=True).count(1) == 2
    assert t.decode(expected) == text


def test_sentencepiece_equals_transformers_llama_tokenizer(sp_dir):
    import google.protobuf  # noqa: F401  (transformers needs protobuf to read a tokenizer.model)
    import transformers as tf
    t, ref = Tokenizer(sp_dir), tf.LlamaTokenizer.from_pretrained(sp_dir)
    for text in SP_TEXTS:  # texts without leading spaces or inline special tokens, where both conventions agree
        assert t.encode(text) == ref.encode(text), text
        assert t.decode(t.encode(text), skip_special_tokens=True) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_sentencepiece_stream_decode_byte_fallback(sp_dir):
    t = Tokenizer(sp_dir)
    text = "hello 😀 ƒ 中文 world"
    ids = t.encode(text, bos=False)
    assert len(ids) > len(text.split())  # 😀 and ƒ are unseen: byte-fallback pieces
    dec = t.stream_decoder()
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert out == t.decode(ids) == text


def test_prefers_tokenizer_json_over_model(sp_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    d = tmp_path / "both"
    shutil.copytree(sp_dir, d)
    HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2}, unk_token="hello")).save(str(d / "tokenizer.json"))
    t = Tokenizer(d)
    assert t.backend == "tokenizers" and t.vocab_size == 3 and t.bos_id == 0
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>[INST] x [/INST]"
