"""Seq2seq batches from Summarization/JSON data for an encoder-decoder model: encoder ids + EOS, labels = target + EOS
(pad -100), decoder inputs = transformers' `_shift_right(labels)`, truncation counted; and the training loss on such a
batch equals transformers' T5 loss (the tied head's d_model**-0.5 rescale included)."""

import json

import pytest
import torch
import transformers as tf
from t5_support import random_t5_hf, samsum_rows, tiny_t5_folder

from leantune.checkpoint.t5_hf import load_t5_checkpoint
from leantune.data import JSON, DataError, Summarization
from leantune.tokenizer import Tokenizer
from leantune.train.loss import seq2seq_ce_sum


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("s2s")
    rows = samsum_rows(12)
    (root / "samsum.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_t5_folder(root / "t5", rows), root / "samsum.jsonl", rows


def test_summarization_batches_match_transformers_preprocessing(folder):
    model_dir, data_file, rows = folder
    tok = Tokenizer(model_dir)
    ref = tf.AutoTokenizer.from_pretrained(model_dir)
    data = Summarization(json_path=data_file, val_split_fraction=0.0)
    data.connect(tok, max_seq_length=256, batch_size=4, decoder_start_id=0)
    data.setup()
    batch = next(iter(data.val_dataloader() if len(data.val_dataset) else data.train_dataloader()))
    by_id = {i: r for i, r in enumerate(rows)}
    for b, (sid,) in enumerate(batch["sample_ids"]):
        row = by_id[sid]
        src = f"Summarize the following conversation.\n\n{row['dialogue']}\n\nSummary: "
        want_src = ref(src).input_ids  # T5's tokenizer appends </s>
        want_tgt = ref(text_target=row["summary"]).input_ids
        n, m = len(want_src), len(want_tgt)
        assert batch["input_ids"][b, :n].tolist() == want_src and batch["attention_mask"][b].sum() == n
        assert batch["labels"][b, :m].tolist() == want_tgt and (batch["labels"][b, m:] == -100).all()
    hf = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=0))
    assert torch.equal(batch["decoder_input_ids"], hf._shift_right(batch["labels"]))


def test_decoder_only_connect_is_unchanged_and_json_gives_seq2seq(folder, tmp_path):
    model_dir, _, _ = folder
    tok = Tokenizer(model_dir)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in ("cookies", "bread")))
    plain = JSON(json_path=f, val_split_fraction=0.0)
    plain.connect(tok, max_seq_length=512)
    plain.setup()
    assert "decoder_input_ids" not in next(iter(plain.train_dataloader()))
    s2s = JSON(json_path=f, val_split_fraction=0.0)
    s2s.connect(tok, max_seq_length=512, batch_size=2, decoder_start_id=0)
    s2s.setup()
    batch = next(iter(s2s.train_dataloader()))
    for b in range(2):
        target = tok.decode(batch["labels"][b][batch["labels"][b] != -100].tolist(), skip_special_tokens=True)
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, :n].tolist() == tok.encode(f"say {target}", eos=True)


def test_truncation_is_counted_or_refused(folder):
    model_dir, data_file, rows = folder
    tok = Tokenizer(model_dir)
    cut = Summarization(json_path=data_file, val_split_fraction=0.0, truncation="truncate_response")
    cut.connect(tok, max_seq_length=10, decoder_start_id=0)
    with pytest.warns(UserWarning, match=f"of {len(rows)} samples longer than 10 tokens"):
        cut.setup()
    assert all(len(s.input_ids) == 10 and s.input_ids[-1] == tok.eos_id for s in cut.train_dataset.samples)
    assert cut.stats()["train"]["truncated"] == len(rows)
    drop = Summarization(json_path=data_file, val_split_fraction=0.0)
    drop.connect(tok, max_seq_length=10, decoder_start_id=0)
    with pytest.raises(DataError, match="dropped"):
        drop.setup()
    with pytest.raises(ValueError, match="packing"):
        Summarization(json_path=data_file).connect(tok, packing=True, decoder_start_id=0)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_seq2seq_loss_equals_transformers(tmp_path, variant):
    ref, path = random_t5_hf(variant, tmp_path / "m", noise=0.3)
    ours = load_t5_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    labels = torch.randint(2, 96, (2, 6), generator=g)
    labels[1, 4:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": ref._shift_right(labels)}
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = seq2seq_ce_sum(ours, batch) / (labels != -100).sum()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
