"""SFT tokenization (masking, BOS/EOS, pre-shifted labels, truncation) and batching (padding, packing, order)."""

from __future__ import annotations

import pytest
import torch
from data_support import CHATML_TEMPLATE, StubTokenizer, supervised_text

from leantune.data.collate import collate_rows, first_fit, plan_epoch
from leantune.data.errors import DataError, Skips
from leantune.data.prompts import PromptStyle, Segment, TemplateStyle
from leantune.data.sft import Example, encode_segments, make_sample, shift_labels, tokenize_example

ALPACA = PromptStyle.from_name("alpaca")


def ex(output="2 7 9", instruction="Sort: 7 2 9", line=3, sample_id=2, **extra):
    return Example({"instruction": instruction, "input": "", "output": output, **extra}, "data/x.jsonl", line,
                   sample_id)


def sample_of(example, tok=None, style=ALPACA, max_len=2048, skips=None, **kw):
    return tokenize_example(example, style, tok or StubTokenizer(), max_len, skips or Skips(), **kw)


def test_prompt_masked_reply_and_eos_supervised_labels_preshifted():
    tok = StubTokenizer(use_bos=True)
    s = sample_of(ex(), tok)
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    prompt = tok.encode(ALPACA.render_prompt(ex().record))
    assert ids == prompt + tok.encode("2 7 9", bos=False) + [tok.eos_id]
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert labels == [-100] * (len(prompt) - 1) + ids[len(prompt):] + [-100]
    assert all(lab == ids[t + 1] for t, lab in enumerate(labels) if lab != -100)  # labels[t] targets input t+1
    assert supervised_text(tok, s) == "2 7 9</s>"
    assert s.sample_id == 2 and s.origin == "data/x.jsonl:3"


def test_mask_prompt_false_trains_on_everything():
    tok = StubTokenizer(use_bos=True)
    s = sample_of(ex(), tok, mask_prompt=False)
    ids = s.input_ids.tolist()
    assert s.labels.tolist() == ids[1:] + [-100]


def test_exactly_one_bos_even_when_the_template_writes_one():
    template = "<s>" + CHATML_TEMPLATE  # a template that puts BOS text in front, like Llama 3's
    tok = StubTokenizer(use_bos=True, chat_template=template, eos_ids=[2, 4])
    s = sample_of(ex(), tok, style=TemplateStyle(tok))
    ids = s.input_ids.tolist()
    assert ids[0] == 1 and ids.count(1) == 1
    no_bos = StubTokenizer(use_bos=False)
    assert 1 not in sample_of(ex(), no_bos).input_ids.tolist()


def test_eos_not_doubled_when_reply_ends_with_an_eos_id():
    tok = StubTokenizer(use_bos=False, eos_ids=[2, 4])  # <|im_end|> (4) ends a chatml reply
    s = sample_of(ex(), tok, style=PromptStyle.from_name("chatml"))
    assert s.input_ids.tolist()[-2:] == [ord("9") + 100, 4]
    assert supervised_text(tok, s) == "2 7 9<|im_end|>"
    other = StubTokenizer(use_bos=False, eos_ids=[2])  # <|im_end|> is not an EOS here: EOS is appended
    assert sample_of(ex(), other, style=PromptStyle.from_name("chatml")).input_ids.tolist()[-2:] == [4, 2]


def test_encode_segments_eos_after_every_reply():
    tok = StubTokenizer(use_bos=False)
    ids, target = encode_segments(tok, [Segment("q", False), Segment("a", True), Segment("q", False),
                                        Segment("b", True)])
    assert ids == [ord("q") + 100, ord("a") + 100, 2, ord("q") + 100, ord("b") + 100, 2]
    assert target == [False, True, True, False, True, True]
    assert shift_labels(ids, target) == [ids[1], 2, -100, ids[4], 2, -100]


def test_truncation_error_names_file_and_line():
    with pytest.raises(DataError) as e:
        sample_of(ex(output="x" * 50), max_len=40)
    assert str(e.value).startswith("data/x.jsonl:3: sample is ")
    assert "longer than max_seq_length 40" in str(e.value) and "--data.truncation" in str(e.value)
    skips = Skips(skip_invalid=True)
    assert sample_of(ex(output="x" * 50), max_len=40, skips=skips) is None
    assert skips.total == 1


def test_truncate_response_keeps_prompt_and_cuts_reply():
    tok = StubTokenizer(use_bos=False)
    style = PromptStyle.from_name("phi")
    prompt_len = len(tok.encode(style.render_prompt(ex().record)))
    s = sample_of(ex(output="y" * 30), tok, style=style, max_len=prompt_len + 10, truncation="truncate_response")
    assert len(s) == prompt_len + 10 and s.full_length == prompt_len + 32
    assert s.labels.tolist()[-1] == -100 and s.n_supervised == 10  # reply tokens in the window; the last has no target
    skips = Skips()
    assert sample_of(ex(), tok, style=style, max_len=prompt_len, truncation="truncate_response", skips=skips) is None
    assert list(skips.counts) == [f"prompt fills max_seq_length {prompt_len}, nothing left to train on"]


def test_drop_is_counted_never_silent():
    skips = Skips()
    assert sample_of(ex(output="z" * 80), max_len=50, truncation="drop", skips=skips) is None
    assert skips.counts == {"longer than max_seq_length 50 (truncation=drop)": 1}
    with pytest.warns(UserWarning, match=r"test: dropped 1 of 1 samples longer than 50 tokens; "
                                          r"--train.max_seq_length \d+ keeps them"):
        skips.report("test")


def test_zero_supervised_sample_never_passes():
    conv = Example({"messages": [{"role": "user", "content": "hi"}]}, "c.jsonl", 7, 6)
    with pytest.raises(DataError, match=r"c\.jsonl:7: no supervised tokens"):
        sample_of(conv)
    skips = Skips(skip_invalid=True)
    assert sample_of(conv, skips=skips) is None and skips.total == 1


# ---- batching ------------------------------------------------------------------------------------------------------
def toy_samples(lengths, start=0):
    out = []
    for k, n in enumerate(lengths):
        ids = list(range(start + 10 * k + 3, start + 10 * k + 3 + n))
        target = [False] * (n // 2) + [True] * (n - n // 2)
        out.append(make_sample(ids, shift_labels(ids, target), sample_id=100 + k))
    return out


def test_padded_collate():
    samples = toy_samples([3, 5])
    b = collate_rows([[samples[0]], [samples[1]]], pad_id=9)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, 5)
    assert b["input_ids"][0].tolist() == samples[0].input_ids.tolist() + [9, 9]
    assert b["labels"][0].tolist() == samples[0].labels.tolist() + [-100, -100]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["sample_ids"] == [[100], [101]] and "position_ids" not in b


def test_packed_rows_reproduce_samples_and_never_cross_boundaries():
    samples = toy_samples([4, 3, 5, 2, 6, 1, 3])
    rows = first_fit(list(range(len(samples))), [len(s) for s in samples], capacity=8)
    batch = collate_rows([[samples[i] for i in row] for row in rows], pad_id=0, packed=True)
    ids, labels, pos, seg = batch["input_ids"], batch["labels"], batch["position_ids"], batch["segment_ids"]
    seen = []
    for b, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            s, n = samples[i], len(samples[i])
            assert ids[b, start:start + n].tolist() == s.input_ids.tolist()
            assert labels[b, start:start + n].tolist() == s.labels.tolist()
            assert pos[b, start:start + n].tolist() == list(range(n))
            assert seg[b, start:start + n].tolist() == [k] * n
            assert labels[b, start + n - 1] == -100  # a sample never predicts the next one's first token
            start += n
            seen.append(s.sample_id)
        assert start <= 8
        assert seg[b, start:].eq(0).all() and labels[b, start:].eq(-100).all()
        assert batch["attention_mask"][b].sum() == start
        for t in range(ids.shape[1] - 1):  # every target is the next token of the same segment
            if labels[b, t] != -100:
                assert labels[b, t] == ids[b, t + 1] and seg[b, t] == seg[b, t + 1]
    assert sorted(seen) == sorted(s.sample_id for s in samples)
    assert batch["sample_ids"] == [[100 + i for i in row] for row in rows]


def test_first_fit_matches_naive_first_fit():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (300,), generator=g).tolist()
    order = torch.randperm(300, generator=g).tolist()
    naive: list[list[int]] = []
    room: list[int] = []
    for i in order:
        k = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if k is None:
            naive.append([])
            room.append(64)
            k = len(naive) - 1
        naive[k].append(i)
        room[k] -= lengths[i]
    assert first_fit(order, lengths, 64) == naive


def test_epoch_plans_are_deterministic_and_resumable():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11]
    a = plan_epoch(lengths, 3, seed=1, epoch=0)
    assert a == plan_epoch(lengths, 3, seed=1, epoch=0)
    assert a != plan_epoch(lengths, 3, seed=1, epoch=1) and a != plan_epoch(lengths, 3, seed=2, epoch=0)
    assert sorted(i for batch in a for row in batch for i in row) == list(range(len(lengths)))
    packed = plan_epoch(lengths, 2, seed=1, epoch=0, packing=True, max_seq_length=12)
    assert packed == plan_epoch(lengths, 2, seed=1, epoch=0, packing=True, max_seq_length=12)
    assert all(sum(lengths[i] for i in row) <= 12 for batch in packed for row in batch)


def test_length_grouping_reduces_padding_and_keeps_every_sample():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (512,), generator=g).tolist()

    def padding(plan):
        return sum(len(b) * max(lengths[r[0]] for r in b) - sum(lengths[r[0]] for r in b) for b in plan)

    grouped = plan_epoch(lengths, 8, seed=3, epoch=0, length_grouping=True)
    plain = plan_epoch(lengths, 8, seed=3, epoch=0)
    assert sorted(r[0] for b in grouped for r in b) == list(range(512))
    assert padding(grouped) < padding(plain) / 4
    assert grouped == plan_epoch(lengths, 8, seed=3, epoch=0, length_grouping=True)
