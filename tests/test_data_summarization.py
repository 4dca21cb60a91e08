"""--data Summarization on samsum-format rows: flan-t5's prompt for a seq2seq model, an SFT sample (prompt masked,
summary + EOS supervised) for a decoder model, and over-long samples counted and reported, never silently lost."""

from __future__ import annotations

import json
import warnings

import pytest
from data_support import StubTokenizer, supervised_text

from leantune.cli import main
from leantune.data import Summarization, get_data_module
from leantune.data.prompts import PromptStyle
from leantune.data.summarization import seq2seq_pair

ROWS = [
    {"id": "13818513", "dialogue": "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you "
     "tomorrow :-)", "summary": "Amanda baked cookies and will bring Jerry some tomorrow."},
    {"id": "13728867", "dialogue": "Olivia: Who are you voting for?\nOliver: Liberals as always.",
     "summary": "Oliver votes for the liberals."},
    {"id": "13681000", "dialogue": "Steve: BTW, USA won last night!\nGulab: I forgot to check!\nSteve: England playing "
     "tomorrow at 2:00!\nGulab: That's right, Croatia?\nSteve: Yep.",
     "summary": "USA won last night. England is playing against Croatia tomorrow at 2."},
    {"id": "13730747", "dialogue": "Sam: is Ivan coming?\nNoah: no, he's sick", "summary": "Ivan is sick."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def set_up(module, style="alpaca", max_seq_length=2048):
    """(module after setup, warnings it emitted, tokenizer)."""
    tok = StubTokenizer(use_bos=False, eos_ids=[2, 4])  # <|im_end|> ends a chatml reply
    module.connect(tok, prompt_style=style, max_seq_length=max_seq_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup()
    return module, [str(w.message) for w in caught], tok


def test_samsum_rows_give_flan_t5s_prompt_for_a_seq2seq_model(tmp_path):
    train, val = Summarization(json_path=write_jsonl(tmp_path / "samsum.jsonl", ROWS)).load_examples()
    assert val is None and [e.line for e in train] == [1, 2, 3, 4]
    for example, row in zip(train, ROWS):
        source, target = seq2seq_pair(example.record)
        assert source == f"Summarize the following conversation.\n\n{row['dialogue']}\n\nSummary: "
        assert target == row["summary"]
    json_record = {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"}
    assert seq2seq_pair(json_record, cue="") == ("Translate to French.\n\ncheese", "fromage")


@pytest.mark.parametrize("style", ["alpaca", "chatml"])
def test_decoder_samples_mask_the_prompt_and_supervise_the_summary(tmp_path, style):
    path = write_jsonl(tmp_path / "samsum.jsonl", ROWS)
    module, messages, tok = set_up(Summarization(json_path=path, val_split_fraction=0.0), style)
    assert messages == [] and len(module.train_dataset) == len(ROWS) and len(module.val_dataset) == 0
    rendered = PromptStyle.from_name(style)
    eos = "</s>" if style == "alpaca" else "<|im_end|>"
    for sample in module.train_dataset.samples:
        row = ROWS[int(sample.origin.rsplit(":", 1)[1]) - 1]
        record = {"instruction": "Summarize the following conversation.", "input": row["dialogue"]}
        prompt = rendered.render_prompt(record)
        assert row["dialogue"] in prompt and "Summarize the following conversation." in prompt
        assert tok.decode(sample.input_ids.tolist()) == prompt + row["summary"] + eos
        assert supervised_text(tok, sample) == row["summary"] + eos  # only the summary (and its end) is trained
        n_prompt = len(tok.encode(prompt, bos=False))
        assert sample.labels[: n_prompt - 1].eq(-100).all() and sample.labels[n_prompt - 1] != -100


def test_over_long_samples_are_dropped_or_cut_and_counted(tmp_path):
    long_row = {"id": "1", "dialogue": "Ann: hi\nBob: hello", "summary": "They greet each other. " * 30}
    path = write_jsonl(tmp_path / "samsum.jsonl", [*ROWS, long_row])
    limit = 500  # one id per character: every ROWS sample (alpaca prompt + summary + EOS) fits, the long one does not
    module, messages, _ = set_up(Summarization(json_path=path, val_split_fraction=0.0), max_seq_length=limit)
    assert len(module.train_dataset) == len(ROWS)
    assert len(messages) == 1 and messages[0].startswith(f"Summarization: dropped 1 of {len(ROWS) + 1} samples "
                                                         f"longer than {limit} tokens") and f"{path}:5" in messages[0]
    assert module.stats()["skipped"] == {f"longer than max_seq_length {limit} (truncation=drop)": 1}

    module, messages, tok = set_up(Summarization(json_path=path, val_split_fraction=0.0,
                                                 truncation="truncate_response"), max_seq_length=limit)
    cut = next(s for s in module.train_dataset.samples if s.origin == f"{path}:5")
    assert len(cut) == limit and cut.full_length > limit and supervised_text(tok, cut).startswith("They greet")
    assert module.stats()["train"]["truncated"] == 1
    assert len(messages) == 1 and messages[0].startswith(f"Summarization: cut the reply of 1 of {len(ROWS) + 1}")


def test_hf_layout_folder_and_json_list_through_the_cli(tmp_path, default_checkpoint, capsys):
    folder = tmp_path / "samsum"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(ROWS[:3]))  # the samsum corpus ships JSON lists
    write_jsonl(folder / "validation.jsonl", ROWS[3:])
    module = get_data_module("summarization", json_path=folder)
    assert isinstance(module, Summarization)
    train, val = module.load_examples()
    assert [e.record["output"] for e in val] == [ROWS[3]["summary"]] and len(train) == 3
    main(["data", "preview", "--data", "Summarization", "--data.json_path", str(folder), "--checkpoint_dir",
          str(default_checkpoint), "--num_samples", "1"])
    out = capsys.readouterr().out
    assert "Summarize the following conversation." in out and "train: 3 samples" in out
