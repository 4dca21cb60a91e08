"""Over-long samples: by default they are dropped and counted (never a stopped run), the report names the length
that keeps them, reply cuts are counted too, and only an empty result is refused. One default length everywhere."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
from data_support import FIXTURES, StubTokenizer

from leantune.data import JSON, Alpaca, DataError

LONG = FIXTURES / "long_sample_alpaca.json"  # Alpaca layout, 12 rows; the row on line 8 is an 8k-character article
ROWS = 12


def setup_quietly(module, tok=None, max_seq_length=512, style="alpaca"):
    """setup() and the warnings it emitted."""
    module.connect(tok or StubTokenizer(use_bos=False), prompt_style=style, max_seq_length=max_seq_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup()
    return module, [str(w.message) for w in caught]


def full_length_of_long_row(tok=None, style="alpaca") -> int:
    module, _ = setup_quietly(Alpaca(local_path=LONG, val_split_fraction=0.0, truncation="truncate_response"), tok,
                              max_seq_length=100_000, style=style)
    return max(s.full_length for s in module.train_dataset.samples)


def test_long_sample_is_dropped_by_default_and_reported_once():
    longest = full_length_of_long_row()
    module, messages = setup_quietly(Alpaca(local_path=LONG))
    assert len(module.train_dataset) + len(module.val_dataset) == ROWS - 1
    assert messages == [f"Alpaca: dropped 1 of {ROWS} samples longer than 512 tokens; --train.max_seq_length "
                        f"{longest} keeps them (longest: {LONG}:8)"]
    assert module.stats()["skipped"] == {"longer than max_seq_length 512 (truncation=drop)": 1}
    assert all(s.origin != f"{LONG}:8" for s in module.train_dataset.samples + module.val_dataset.samples)


def test_the_named_length_keeps_every_sample():
    longest = full_length_of_long_row()
    module, messages = setup_quietly(Alpaca(local_path=LONG), max_seq_length=longest)
    assert messages == [] and len(module.train_dataset) + len(module.val_dataset) == ROWS


def test_truncate_response_cuts_are_counted_and_reported(tmp_path):
    path = tmp_path / "long_reply.jsonl"
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Tell a story.", "output": "Once " * 40},
            {"instruction": "Say bye.", "output": "Bye."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module, messages = setup_quietly(JSON(json_path=path, val_split_fraction=0.0, truncation="truncate_response"),
                                     max_seq_length=64, style="chatml")
    assert len(module.train_dataset) == 3
    cut = next(s for s in module.train_dataset.samples if s.origin == f"{path}:2")
    assert len(cut) == 64 and cut.full_length > 200 and cut.n_supervised > 0
    assert messages == [f"JSON: cut the reply of 1 of 3 samples longer than 64 tokens; --train.max_seq_length "
                        f"{cut.full_length} keeps them whole (longest: {path}:2)"]
    assert module.stats()["train"]["truncated"] == 1


def test_truncate_response_cannot_cut_a_prompt_that_is_too_long():
    module, messages = setup_quietly(Alpaca(local_path=LONG, val_split_fraction=0.0, truncation="truncate_response"))
    assert len(module.train_dataset) == ROWS - 1  # the long row's prompt (the article) alone exceeds 512
    assert messages == [f"Alpaca: skipped 1 sample(s):\n  1 x prompt fills max_seq_length 512, nothing left to "
                        f"train on (first: {LONG}:8)"]


def test_error_policy_still_stops_at_the_row():
    with pytest.raises(DataError, match=r"long_sample_alpaca\.json:8: sample is \d+ tokens"):
        setup_quietly(Alpaca(local_path=LONG, truncation="error"))


def test_nothing_left_is_a_clear_error(tmp_path):
    path = tmp_path / "all_long.json"
    rows = [{"instruction": "Go on.", "input": "", "output": "word " * (20 + 10 * i)} for i in range(3)]
    path.write_text(json.dumps(rows))
    cut, _ = setup_quietly(JSON(json_path=path, val_split_fraction=0.0, truncation="truncate_response"),
                           max_seq_length=64, style="chatml")
    longest = max(s.full_length for s in cut.train_dataset.samples)
    with pytest.raises(DataError) as e:
        setup_quietly(JSON(json_path=path, val_split_fraction=0.0), max_seq_length=64, style="chatml")
    assert str(e.value) == (
        f"JSON: the training split is empty: dropped 3 of 3 samples longer than 64 tokens; --train.max_seq_length "
        f"{longest} keeps them (longest: {path}:1). Raise --train.max_seq_length (to {longest} to keep every "
        "sample), or set --data.truncation truncate_response to cut the replies instead of dropping them.")


def test_real_tokenizer_names_the_real_length(default_checkpoint):
    from leantune.tokenizer import Tokenizer

    tok = Tokenizer(default_checkpoint)
    longest = full_length_of_long_row(tok, style="chatml")
    assert longest > 1024  # a realistic over-long sample, like the Self-Instruct seed task of 1411 tokens
    module, messages = setup_quietly(Alpaca(local_path=LONG), tok, style="chatml")
    assert messages == [f"Alpaca: dropped 1 of {ROWS} samples longer than 512 tokens; --train.max_seq_length "
                        f"{longest} keeps them (longest: {LONG}:8)"]


def test_one_default_max_seq_length():
    from leantune.commands.data import preview as preview_command
    from leantune.commands.evaluate import evaluate
    from leantune.data import DEFAULT_MAX_SEQ_LENGTH, DataModule
    from leantune.train.args import TrainArgs

    assert DEFAULT_MAX_SEQ_LENGTH == 512 == TrainArgs().max_seq_length
    assert inspect.signature(evaluate).parameters["max_seq_length"].default == DEFAULT_MAX_SEQ_LENGTH
    assert inspect.signature(preview_command).parameters["max_seq_length"].default == DEFAULT_MAX_SEQ_LENGTH
    assert inspect.signature(DataModule.connect).parameters["max_seq_length"].default == DEFAULT_MAX_SEQ_LENGTH
    assert DataModule().max_seq_length == DEFAULT_MAX_SEQ_LENGTH


def test_preview_measures_what_training_drops(default_checkpoint, capsys):
    from leantune.commands.data import preview as preview_command
    from leantune.tokenizer import Tokenizer

    longest = full_length_of_long_row(Tokenizer(default_checkpoint), style="chatml")
    stats = preview_command(Alpaca(local_path=LONG), default_checkpoint, num_samples=1, prompt_style="chatml")
    out = capsys.readouterr().out
    assert stats["max_seq_length"] == 512
    assert stats["train"]["over_max_seq_length"] + stats["val"].get("over_max_seq_length", 0) == 1
    assert (f"note: training drops the 1 sample(s) longer than 512 tokens (--data.truncation drop); "
            f"--train.max_seq_length {longest} keeps them (longest: {LONG}:8)") in out
