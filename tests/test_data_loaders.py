"""Every dataset module against small local fixtures in its upstream layout (no network)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import typing

import pytest
from data_support import FIXTURES, StubTokenizer, supervised_text

import leantune.data as data_pkg
from leantune.data import (
    FLAN,
    JSON,
    LIMA,
    Alpaca,
    Chat,
    DataError,
    DataModule,
    Demo,
    Dolly,
    LongForm,
    Summarization,
    Text,
    get_data_module,
)
from leantune.data.prompts import to_messages


def records(module):
    train, val = module.load_examples()
    return [e.record for e in train], (None if val is None else [e.record for e in val])


def connected(module, style="chatml", max_seq_length=2048, **kw):
    tok = StubTokenizer(use_bos=False, eos_ids=[2, 4])
    module.connect(tok, prompt_style=style, max_seq_length=max_seq_length, **kw)
    module.setup()
    return module, tok


def test_alpaca_local_file_and_cache(tmp_path):
    examples, _ = Alpaca(local_path=FIXTURES / "alpaca_data.json").load_examples()
    assert [(e.line, e.sample_id) for e in examples] == [(2, 0), (7, 1), (12, 2), (17, 3)]  # where each row starts
    train, val = records(Alpaca(local_path=FIXTURES / "alpaca_data.json"))
    assert val is None and len(train) == 4
    assert train[1] == {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.",
                        "output": "Le chat dort."}
    cache = tmp_path / "cache"
    (cache / "alpaca-cleaned").mkdir(parents=True)
    shutil.copy(FIXTURES / "alpaca_data.json", cache / "alpaca-cleaned" / "alpaca_data_cleaned.json")
    module = Alpaca(version="alpaca-cleaned", cache_dir=cache)
    assert len(records(module)[0]) == 4  # a cached file is used as is: no network
    assert (cache / "alpaca-cleaned" / "alpaca_data_cleaned.json.sha256").is_file()  # recorded for next time
    module, _ = connected(Alpaca(local_path=FIXTURES / "alpaca_data.json", val_split_fraction=0.25))
    assert (len(module.train_dataset), len(module.val_dataset)) == (3, 1)


def test_alpaca_2k_parquet_needs_pyarrow(tmp_path, monkeypatch):
    # hidden even where pyarrow is installed (lm-eval's datasets brings it): a None entry makes its import fail
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pyarrow"):
        Alpaca(version="alpaca-2k", local_path=tmp_path / "x.parquet").load_examples()


def test_alpaca_2k_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
            {"instruction": "Uppercase:", "input": "cat", "output": "CAT"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    examples, _ = Alpaca(version="alpaca-2k", local_path=tmp_path / "x.parquet").load_examples()
    assert [(e.line, e.record["output"]) for e in examples] == [(1, "3"), (2, "CAT")]


def test_json_with_utf8_bom_and_blank_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    examples, _ = JSON(json_path=path).load_examples()
    assert [(e.line, e.sample_id, e.record["output"]) for e in examples] == [(1, 0, "b"), (3, 1, "d")]


def test_dolly_context_becomes_input():
    train, _ = records(Dolly(local_path=FIXTURES / "databricks-dolly-15k.jsonl"))
    assert len(train) == 3
    assert train[0]["input"].startswith("Virgin Australia commenced") and train[1]["input"] == ""
    assert train[1]["output"] == "Tope"


def test_lima_multiturn_modes():
    path = FIXTURES / "lima" / "train.jsonl"
    first, _ = records(LIMA(local_path=path))
    flat, _ = records(LIMA(local_path=path, multiturn="flatten"))
    kept, _ = records(LIMA(local_path=path, multiturn="keep"))
    assert len(first) == 3 and len(flat) == 4 and len(kept) == 3
    assert flat[2] == {"instruction": "Now one about snow.", "input": "", "output": "White hush on the field"}
    assert [m["role"] for m in kept[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    module, tok = connected(LIMA(local_path=path, multiturn="keep", val_split_fraction=0.0))
    multi = next(s for s in module.train_dataset.samples if s.sample_id == 1)
    assert supervised_text(tok, multi) == "Soft rain on the roof<|im_end|>White hush on the field<|im_end|>"


def test_longform_folder():
    train, val = records(LongForm(local_path=FIXTURES / "longform"))
    assert len(train) == 2 and len(val) == 1
    assert train[0]["instruction"] == "Write a paragraph about the history of tea."
    with pytest.raises(DataError, match="not a folder"):
        LongForm(local_path=FIXTURES / "longform" / "train.json").load_examples()


def test_flan_subsets_from_folder():
    module = FLAN(local_path=FIXTURES / "flan", subsets="aeslc_10templates")
    train, val = records(module)
    assert len(train) == 2 and len(val) == 1
    assert train[0]["output"] == "Contract review" and train[0]["instruction"].startswith("Write a subject line")
    assert len(FLAN().selected_subsets()) == 66
    with pytest.raises(ValueError, match="unknown FLAN subset"):
        FLAN(subsets="nope").selected_subsets()


def test_json_file_folder_and_custom_fields():
    train, val = records(JSON(json_path=FIXTURES / "json_folder"))
    assert len(train) == 3 and val == [{"instruction": "Say bye.", "input": "", "output": "Bye!"}]
    assert train[1]["system"] == "You repeat words." and train[1]["input"] == "echo"
    custom, _ = records(JSON(json_path=FIXTURES / "custom_fields.jsonl", instruction_key="question",
                             output_key="answer"))
    assert custom[0] == {"instruction": "Capital of France?", "input": "", "output": "Paris"}
    with pytest.raises(DataError, match='custom_fields.jsonl:1: missing field "instruction"'):
        JSON(json_path=FIXTURES / "custom_fields.jsonl").load_examples()


def test_chat_openai_and_sharegpt():
    openai, _ = records(Chat(json_path=FIXTURES / "chat" / "openai.jsonl"))
    assert openai[1]["messages"] == [{"role": "user", "content": "Name a fruit."},
                                     {"role": "assistant", "content": "Apple."}]
    share, _ = records(Chat(json_path=FIXTURES / "chat" / "sharegpt.json", system_prompt="Be nice."))
    assert [m["role"] for m in to_messages(share[0])] == ["system", "user", "assistant", "user", "assistant"]
    assert to_messages(share[0])[0]["content"] == "Be nice." and to_messages(share[1])[0]["content"] == "Answer in French."
    assert [m["role"] for m in share[0]["messages"]] == ["user", "assistant", "user", "assistant"]  # as in the file
    module, tok = connected(Chat(json_path=FIXTURES / "chat" / "sharegpt.json", val_split_fraction=0.0))
    texts = sorted(supervised_text(tok, s) for s in module.train_dataset.samples)
    assert texts == ["Blue.<|im_end|>Black.<|im_end|>", "Merci<|im_end|>"]  # assistant turns only


def test_summarization_layouts():
    samsum, _ = records(Summarization(json_path=FIXTURES / "summarization" / "samsum.jsonl"))
    assert samsum[0]["instruction"] == "Summarize the following conversation."
    assert samsum[0]["input"].startswith("Amanda: I baked cookies.") and samsum[0]["output"].startswith("Amanda baked")
    cnn, _ = records(Summarization(json_path=FIXTURES / "summarization" / "cnn_dailymail.jsonl"))
    assert cnn[1] == {"instruction": "Summarize the following news article.",
                      "input": "The city council approved a new park on Monday after months of debate.",
                      "output": "Council approves new park."}
    custom, _ = records(Summarization(json_path=FIXTURES / "summarization" / "cnn_dailymail.jsonl",
                                      source_key="highlights", target_key="id", instruction="Make an id."))
    assert custom[0] == {"instruction": "Make an id.", "input": "Daniel Radcliffe turns 18 and gains access to his "
                         "fortune.", "output": "42c027e4"}
    with pytest.raises(DataError, match="no summary/highlights field"):
        Summarization(json_path=FIXTURES / "custom_fields.jsonl", source_key="question").load_examples()


def test_text_windows_predict_every_token_once():
    module, tok = connected(Text(path=FIXTURES / "text", val_split_fraction=0.0), max_seq_length=16)
    text = (FIXTURES / "text" / "a.txt").read_text() + "</s>" + (FIXTURES / "text" / "b.txt").read_text() + "</s>"
    ids = tok.encode(text, bos=False)
    samples = sorted(module.train_dataset.samples, key=lambda s: s.sample_id)
    targets = [x for s in samples for x in s.labels.tolist() if x != -100]
    assert targets == ids[1:]  # each token after the first is a target exactly once, in order
    assert all(len(s) <= 16 for s in samples) and "notes" not in "".join(s.origin for s in samples)
    assert module.stats()["train"]["supervised_fraction"] > 0.9


def test_every_module_is_a_cli_ready_dataclass():
    modules = [data_pkg.DATA_MODULES[k] for k in data_pkg.DATA_MODULES]
    assert {m.__name__ for m in modules} == {"Alpaca", "Dolly", "LIMA", "LongForm", "FLAN", "JSON", "Chat",
                                              "Summarization", "Text", "Demo", "Preference", "DemoPreference"}
    for cls in modules:
        assert issubclass(cls, DataModule) and dataclasses.is_dataclass(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in hints and f.default is not dataclasses.MISSING, (cls.__name__, f.name)
        assert getattr(data_pkg, cls.__name__) is cls and cls.__name__ in data_pkg.__all__
        cls()  # every field has a default
    assert isinstance(get_data_module("json", json_path="x.jsonl"), JSON)
    assert isinstance(get_data_module("Demo"), Demo)
    with pytest.raises(ValueError, match="unknown data module"):
        get_data_module("nope")


def test_jsonargparse_builds_modules_from_cli_flags():
    """How the CLI builds `--data ClassName --data.field value` (it must enable subclasses of DataModule)."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(subclasses_enabled=[DataModule])
    parser = ArgumentParser()
    parser.add_argument("--data", type=DataModule | None)
    cfg = parser.parse_args(["--data", "JSON", "--data.json_path", "train.jsonl", "--data.mask_prompt", "false",
                             "--data.truncation", "drop"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # as leantune.commands.sweep
    data = instantiate(cfg).data
    assert isinstance(data, JSON) and str(data.json_path) == "train.jsonl"
    assert data.mask_prompt is False and data.truncation == "drop"
    demo = instantiate(parser.parse_args(["--data", "Demo", "--data.num_train", "50"])).data
    assert isinstance(demo, Demo) and demo.num_train == 50


def test_data_package_never_imports_the_model_or_the_loop():
    import subprocess
    import sys

    # facts only (the family table's default prompt styles and the config they describe): never the model or loop
    allowed = ("leantune.data", "leantune.models.decoder.families", "leantune.models.decoder.config",
               "leantune.models.decoder.presets")
    packages = ("leantune.models", "leantune.models.decoder")  # the empty package __init__s on the way to the facts
    code = ("import sys, leantune.data; "
            f"print(sorted(m for m in sys.modules if m.startswith('leantune.') and not m.startswith({allowed!r}) "
            f"and m not in {packages!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
