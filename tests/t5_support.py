"""Tiny random T5 models written by transformers, shared by the T5 model and generation suites (a helper module, not
a test module)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file, save_file

V = 96
# v1.0: ReLU, head tied to the shared embedding (and the d_model**-0.5 rescale); v1.1 / flan-t5: gated tanh-GELU,
# untied head. Both: more decoder than encoder blocks, few buckets with a short max distance (so the logarithmic
# buckets are used by 30-token inputs).
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def tiny_config(variant: str, num_decoder_layers: int = 3) -> tf.T5Config:
    cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=num_decoder_layers,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0,
                      **VARIANTS[variant])
    cfg._attn_implementation = "sdpa"
    return cfg


def random_t5_hf(variant: str, folder: Path, noise: float = 1.0, seed: int = 0, num_decoder_layers: int = 3):
    """A transformers T5 of `variant` with every tensor perturbed (norms and the bias tables too, so any wrong mapping
    shows), saved with save_pretrained to `folder` and loaded back from there: (model in eval mode, folder).

    transformers 5 ties the head at construction whatever tie_word_embeddings says and unties it on load when the
    checkpoint stores a different one, so the untied variant gets its own random head before saving.
    transformers 5's `generate` sizes its cache by the encoder depth: generation tests need num_decoder_layers=2."""
    torch.manual_seed(seed)
    cfg = tiny_config(variant, num_decoder_layers)
    model = tf.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        if not VARIANTS[variant]["tie_word_embeddings"]:
            # logits of the size a real untied head gives (the tied one is rescaled by d_model**-0.5 instead)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(V, cfg.d_model) * cfg.d_model ** -0.5)
    model.save_pretrained(folder)
    ref = tf.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert (ref.lm_head.weight is ref.shared.weight) == VARIANTS[variant]["tie_word_embeddings"]
    return ref, folder


def as_transformers_4_folder(folder: Path) -> None:
    """Rewrite a transformers-5 folder the way older files look: config.json without the v5-only keys (so
    tie_word_embeddings alone says whether the head is tied and rescaled), and the embedding stored three times
    plus the unused cross-attention bias table some old checkpoints carry."""
    cfg = json.loads((folder / "config.json").read_text())
    tied = cfg.pop("scale_decoder_outputs")
    for k in ("dense_act_fn", "is_gated_act", "dtype", "transformers_version"):
        cfg.pop(k, None)
    cfg["tie_word_embeddings"] = tied
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = load_file(folder / "model.safetensors")
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd[k] = sd["shared.weight"].clone()
    sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def padded_batch(seed: int = 1, B: int = 3, S: int = 30, lengths=(30, 21, 9)):
    """Random encoder inputs (B, S) right-padded to `lengths`, pad positions holding random ids (they must not
    matter), and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def frequent_tokens(hf_model, ids, mask, n: int) -> list[int]:
    """The n tokens a model emits most after the first two steps of a no-EOS beam search: used as EOS ids, so that
    a tiny random model ends some hypotheses early and others at the length limit."""
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3,
                            num_return_sequences=3, eos_token_id=None, pad_token_id=0)
    counts = Counter(t for t in out[:, 3:].flatten().tolist() if t != 0)  # 0 is the pad and start token
    return [t for t, _ in counts.most_common(n)]


def trim(seq: torch.Tensor, eos: list[int]) -> list[int]:
    """Tokens up to and including the first EOS after the start token (transformers pads finished beams with the
    EOS id when pad is 0, leantune with pad: only the content before that is compared)."""
    out = seq.tolist()
    for i in range(1, len(out)):
        if out[i] in eos:
            return out[: i + 1]
    return out


NAMES = ["Amanda", "Tom", "Jerry", "Anna", "Bob", "Carla"]
FOODS = ["cookies", "a cake", "bread", "pizza"]


def samsum_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """samsum-format rows (id, dialogue, summary) with a learnable pattern: the summary names who baked what."""
    import random

    r = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = r.sample(NAMES, 2)
        food = r.choice(FOODS)
        rows.append({"id": f"{i:05d}", "dialogue": f"{a}: I baked {food}.\n{b}: Nice, bring some tomorrow!",
                     "summary": f"{a} baked {food} for {b}."})
    return rows


def tiny_t5_folder(folder: Path, rows: list[dict], variant: str = "v1.1") -> Path:
    """An HF T5 folder: tiny random weights (transformers' init, vocab V) and a tokenizer.json of a Unigram
    sentencepiece model trained on `rows` (T5's layout: pad 0, EOS 1, unk 2, no BOS, sentinels after the vocabulary),
    written by transformers' T5Tokenizer."""
    import io

    import sentencepiece as spm

    text = [f"{x['dialogue']} {x['summary']}" for x in rows] + ["Summarize the following conversation. Summary:"] * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
    sp_dir = folder.parent / f"{folder.name}-spiece"
    sp_dir.mkdir(parents=True)
    (sp_dir / "spiece.model").write_bytes(model.getvalue())
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 4}))
    tokenizer = tf.T5Tokenizer.from_pretrained(sp_dir)
    assert len(tokenizer) <= V
    random_t5_hf(variant, folder, noise=0.0)
    tokenizer.save_pretrained(folder)
    return folder
