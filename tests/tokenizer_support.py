"""Tiny tokenizer folders shared by the tokenizer suites (a helper module, not a test module): a Llama-style
sentencepiece model, and a T5 tokenizer.json rewritten the way transformers 4 wrote it (flan-t5's files)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import sentencepiece as spm

LLAMA_WORDS = "the quick brown fox jumps over lazy dog hello world naïve café 中文 字符 code def return 12345".split()


def llama_sentencepiece_folder(d: Path) -> Path:
    """A tiny Llama-style sentencepiece BPE model (byte fallback, identity normalization) + tokenizer_config."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(LLAMA_WORDS) for _ in range(12)) for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "LlamaTokenizer", "chat_template": "{% for m in messages %}<s>[INST] {{ m['content'] }} "
        "[/INST]{% endfor %}"}))
    return d


def as_transformers_4_t5_json(src: Path, dst: Path, extra_ids: int) -> Path:
    """Copy `src`'s T5 tokenizer.json to `dst` with the pipeline transformers 4 wrote (google/flan-t5-*'s files): the
    charsmap followed by `Replace(" {2,}", " ")`, and a Metaspace pre-tokenizer without WhitespaceSplit (under which
    "Summary: " ends in a "▁" token of its own); tokenizer_config.json as flan-t5 ships it, no `added_tokens_decoder`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    tj = json.loads((dst / "tokenizer.json").read_text())
    charsmap = tj["normalizer"]["precompiled_charsmap"]
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": charsmap},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    tj["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(extra_ids)], "eos_token": "</s>",
        "extra_ids": extra_ids, "model_max_length": 512, "pad_token": "<pad>", "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}))
    return dst
