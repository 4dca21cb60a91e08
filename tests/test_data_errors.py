"""Bad input: one clear error naming `path:line` and the problem per fixture; `skip_invalid` counts instead."""

from __future__ import annotations

import pytest
from data_support import FIXTURES, StubTokenizer

from leantune.data import JSON, Chat, DataError

BAD = FIXTURES / "bad"


def setup_json(path, max_seq_length=2048, style="chatml", **kw):
    data = JSON(json_path=path, **kw)
    data.connect(StubTokenizer(use_bos=False), prompt_style=style, max_seq_length=max_seq_length)
    data.setup()
    return data


@pytest.mark.parametrize("name, line, problem", [
    ("malformed.jsonl", 3, "malformed JSON"),
    ("non_object.jsonl", 2, "row is a JSON list, not an object"),
    ("missing_field.jsonl", 3, 'missing field "output"'),
    ("empty_field.json", 3, 'field "output" is empty'),
    ("empty.jsonl", 1, "empty file"),
    ("latin1.jsonl", 2, "not valid UTF-8 (byte 0xe9)"),
    ("broken_list.json", 4, "malformed JSON (Expecting ',' delimiter"),
    ("one_object.json", 1, "the file is one JSON object, not a list of rows"),
    ("all_invalid.jsonl", 1, 'missing field "output"'),
])
def test_bad_input_names_file_and_line(name, line, problem):
    with pytest.raises(DataError) as e:
        setup_json(BAD / name)
    message = str(e.value)
    assert message.startswith(f"{BAD / name}:{line}: "), message
    assert problem in message
    assert e.value.line == line
    assert message.count(". ") >= 1  # a problem, then how to fix it


def test_prompt_longer_than_max_seq_length_is_an_error_under_truncation_error():
    with pytest.raises(DataError) as e:
        setup_json(BAD / "too_long.jsonl", max_seq_length=64, truncation="error")
    assert str(e.value).startswith(f"{BAD / 'too_long.jsonl'}:2: sample is ")
    assert "longer than max_seq_length 64" in str(e.value) and "--data.truncation" in str(e.value)


def test_chat_without_assistant_turn():
    data = Chat(json_path=BAD / "chat_no_assistant.jsonl")
    with pytest.raises(DataError, match=r"chat_no_assistant\.jsonl:2: conversation has no assistant turn"):
        data.load_examples()


def test_empty_splits():
    with pytest.raises(DataError, match=r"all_invalid\.jsonl:1: no usable rows \(2 invalid row\(s\) skipped\)"):
        setup_json(BAD / "all_invalid.jsonl", skip_invalid=True)
    with pytest.raises(DataError, match="validation split is empty"):
        setup_json(FIXTURES / "json_folder" / "val.json")  # one row: nothing left to hold out
    data = setup_json(FIXTURES / "json_folder" / "val.json", val_split_fraction=0.0)
    assert len(data.train_dataset) == 1 and len(data.val_dataset) == 0


@pytest.mark.parametrize("name, skipped, kept", [
    ("malformed.jsonl", 1, 3), ("non_object.jsonl", 1, 1), ("missing_field.jsonl", 1, 2), ("latin1.jsonl", 1, 1),
])
def test_skip_invalid_counts_and_reports(name, skipped, kept):
    with pytest.warns(UserWarning, match=f"skipped {skipped} sample"):
        data = setup_json(BAD / name, skip_invalid=True, val_split_fraction=0.0)
    assert data.skips.total == skipped
    assert len(data.train_dataset) == kept
    assert sum(data.stats()["skipped"].values()) == skipped


def test_skip_invalid_also_skips_too_long_samples():
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        data = setup_json(BAD / "too_long.jsonl", max_seq_length=64, skip_invalid=True, val_split_fraction=0.0,
                          truncation="error")
    assert [s.sample_id for s in data.train_dataset.samples] == [0]


def test_missing_path_and_folder_without_train_file(tmp_path):
    with pytest.raises(DataError, match="--data.json_path"):
        JSON().load_examples()
    with pytest.raises(DataError, match="no such file"):
        JSON(json_path=tmp_path / "nope.jsonl").load_examples()
    with pytest.raises(DataError, match="no train.json or train.jsonl"):
        JSON(json_path=tmp_path).load_examples()
