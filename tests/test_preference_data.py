"""Preference pairs: the row layouts, the file:line errors of bad pair files, truncation counts, DemoPreference."""

from __future__ import annotations

import json
import random

import pytest
from data_support import CHATML_TEMPLATE, StubTokenizer

from leantune.commands.data import preview as preview_command
from leantune.data import get_data_module
from leantune.data.errors import DataError
from leantune.data.preference import DemoPreference, Preference, convert_pair, wrong_answer


def write(tmp_path, rows, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def setup(module, max_seq_length=512, style="chatml", batch_size=2):
    tok = StubTokenizer(chat_template=CHATML_TEMPLATE)
    module.connect(tok, prompt_style=style, max_seq_length=max_seq_length, batch_size=batch_size)
    module.setup()
    return tok


GOOD = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]


def test_layouts_normalise_to_the_same_pair():
    plain = convert_pair({"prompt": "hi", "chosen": "a", "rejected": "b"})
    ultra = convert_pair({"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                          "content": "a"}],
                          "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]})
    hh = convert_pair({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"})
    implied = convert_pair({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]})
    assert plain == ultra == hh == implied == {"messages": [{"role": "user", "content": "hi"}], "chosen": "a",
                                               "rejected": "b"}


def test_hh_multi_turn_keeps_the_shared_history():
    row = convert_pair({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
                        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no"})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user"]
    assert (row["chosen"], row["rejected"]) == ("ciao", "no")


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "chosen": "a"}, 'missing field "rejected"'),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same response"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, 'the "rejected" response is empty'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},
     "do not share the same prompt"),
])
def test_bad_pair_rows_name_file_and_line(tmp_path, row, problem):
    path = write(tmp_path, [*GOOD[:2], row, *GOOD[2:]])
    with pytest.raises(DataError) as e:
        setup(Preference(json_path=path))
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value), str(e.value)


def test_bad_rows_are_counted_when_skipping(tmp_path):
    path = write(tmp_path, [*GOOD, {"prompt": "q", "chosen": "x", "rejected": "x"}])
    m = Preference(json_path=path, skip_invalid=True, val_split_fraction=0.2)
    with pytest.warns(UserWarning, match="same response"):
        setup(m)
    assert len(m.train_dataset) + len(m.val_dataset) == 6


def test_a_prompt_longer_than_the_context_is_a_file_line_error(tmp_path):
    path = write(tmp_path, [*GOOD, {"prompt": "x" * 80, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=rf"{path}:7: the prompt alone is \d+ tokens, filling max_seq_length 40"):
        setup(Preference(json_path=path, truncation="truncate_response"), max_seq_length=40)


def test_truncation_cuts_responses_and_counts(tmp_path):
    rows = [*GOOD, {"prompt": "q", "chosen": "c" * 60, "rejected": "r" * 5}]
    m = Preference(json_path=write(tmp_path, rows), truncation="truncate_response", val_split_fraction=0)
    with pytest.warns(UserWarning, match="cut the reply of 1 of 7 samples longer than 40 tokens"):
        setup(m, max_seq_length=40)
    long = [s for s in m.train_dataset.samples if s.full_length > 40]
    assert len(long) == 1 and len(long[0]) == 40 and len(long[0].rejected) == 7  # whole: 5 + <|im_end|> + EOS
    m = Preference(json_path=write(tmp_path, rows), truncation="drop", val_split_fraction=0)
    with pytest.warns(UserWarning, match="dropped 1 of 7"):
        setup(m, max_seq_length=40)
    assert len(m.train_dataset) == 6


def test_batches_hold_chosen_then_rejected_with_response_labels(tmp_path):
    m = Preference(json_path=write(tmp_path, GOOD), val_split_fraction=0)
    tok = setup(m, batch_size=2)
    batch = next(iter(m.train_dataloader()))
    assert batch["pairs"] == 2 and batch["input_ids"].shape[0] == 4
    for row in range(4):
        target = [int(x) for x in batch["labels"][row] if x != -100]
        text = tok.decode(target)
        assert text.startswith("yes" if row < 2 else "no") and text.endswith("<|im_end|></s>"), text
        assert batch["input_ids"][row, batch["attention_mask"][row].sum() - 1] == 2  # the reply's EOS, then pad
    assert sorted(batch["pair_index"].tolist()) == batch["pair_index"].sort().values.tolist()


def test_demo_preference_pairs_right_against_plausible_wrong():
    m = get_data_module("demopreference", num_train=40, num_val=10, num_test=10)
    setup(m, style="alpaca")
    assert len(m.train_dataset) == 40 and len(m.val_dataset) == 10 and len(m.test_set()) == 10
    r = random.Random(0)
    for rec in m._demo().test_set():
        wrong = wrong_answer(rec, r)
        assert wrong != rec["output"] and not m.score(wrong, rec["output"])


def test_preview_shows_pairs(default_checkpoint, capsys):
    stats = preview_command(DemoPreference(num_train=12, num_val=3, num_test=3), default_checkpoint, num_samples=2)
    out = capsys.readouterr().out
    assert out.count("--- pair") == 2 and out.count("  chosen:   [[") == 2 and out.count("  rejected: [[") == 2
    assert "<|im_start|>assistant\n" in out and "train: 12 samples" in out
    assert stats["train"]["count"] == 12
