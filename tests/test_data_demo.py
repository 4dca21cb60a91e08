"""The built-in demo tasks: deterministic disjoint splits, correct answers, the scorer; end to end on SmolLM2."""

from __future__ import annotations

import re

import pytest
import torch

from leantune.data import Demo
from leantune.data.demo import TASKS, generate


def test_splits_deterministic_and_disjoint():
    demo = Demo()
    test = demo.test_set()
    train, val = (list(x) for x in demo.load_examples())
    assert len(test) == 100 and len(train) == 800 and len(val) == 100
    prompts = [r["instruction"] for r in test] + [e.record["instruction"] for e in train + val]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, so test prompts never appear in training
    assert Demo().test_set() == test and [e.record for e in Demo().load_examples()[0]] == [e.record for e in train]
    assert Demo(num_train=50).test_set() == test  # the test set does not depend on the training size
    assert Demo(task_seed=1).test_set() != test
    assert {r["task"] for r in test} == set(TASKS)
    assert [e.sample_id for e in train] == list(range(800))


def recompute(record: dict) -> str:
    """An independent solver for every task, parsed back from the instruction text."""
    q = record["instruction"]
    after = q.rsplit(": ", 1)[-1]
    if record["task"] == "sort":
        return " ".join(map(str, sorted(int(x) for x in after.split())))
    if record["task"] == "reverse":
        return " ".join(after.split()[::-1])
    if record["task"] == "count":
        letter, word = re.findall(r'"(\w+)"', q)
        return str(word.count(letter))
    if record["task"] in ("add", "subtract"):
        a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)\?", q).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if record["task"] == "convert":
        n, unit = re.search(r"Convert (\d+) (\w+) to", q).groups()
        return str(int(n) * {"kilometers": 1000, "kilograms": 1000, "hours": 60}[unit])
    if record["task"] == "uppercase":
        return re.search(r'"(\w+)"', q).group(1).upper()
    raise AssertionError(record)


def test_answers_are_correct_and_short():
    for split in generate(7, (60, 60, 300)):
        for record in split:
            assert record["output"] == recompute(record), record
            assert len(record["output"]) <= 40 and record["input"] == ""


def test_score_normalises_whitespace_and_trailing_period():
    assert Demo.score(" 2  7\n9. ", "2 7 9")
    assert Demo.score("APPLE", "APPLE.")
    assert not Demo.score("apple", "APPLE")
    assert not Demo.score("2 7 9 10", "2 7 9")
    assert not Demo.score("", "0")


def test_task_subset_option():
    assert {r["task"] for r in Demo(tasks="add,uppercase").test_set()} == {"add", "uppercase"}
    with pytest.raises(ValueError, match="unknown demo task"):
        Demo(tasks="add,fly").test_set()


@pytest.fixture(scope="module")
def smol(default_checkpoint):
    from leantune.tokenizer import Tokenizer

    return Tokenizer(default_checkpoint)


@pytest.mark.parametrize("packing", [False, True])
def test_demo_end_to_end_batches(smol, packing):
    demo = Demo(num_train=64, num_val=8)
    demo.connect(smol, max_seq_length=256, batch_size=4, seed=3, packing=packing)
    demo.setup()
    assert demo.prompt_style.name == "template"
    loader = demo.train_dataloader(epoch=0)
    batches = list(loader)
    assert len(batches) == len(loader)
    again = list(demo.train_dataloader(epoch=0))  # resumable: same (seed, epoch) -> same batches
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and a["sample_ids"] == b["sample_ids"]
               for a, b in zip(batches, again))
    other = list(demo.train_dataloader(epoch=1))
    assert [b["sample_ids"] for b in other] != [b["sample_ids"] for b in batches]
    seen = sorted(i for b in batches for row in b["sample_ids"] for i in row)
    assert seen == list(range(64))  # every training sample exactly once per epoch
    for b in batches:
        assert (b["labels"] != -100).sum(dim=1).gt(0).all()  # every row has targets
        assert b["input_ids"].shape[1] <= 256 and b["input_ids"].dtype == torch.long
        assert ("position_ids" in b) == packing
    val = list(demo.val_dataloader())
    assert sum(len(b["sample_ids"]) for b in val) == 8
    stats = demo.stats()
    assert stats["train"]["count"] == 64 and 0 < stats["train"]["supervised_fraction"] < 0.3


def test_demo_prompt_for_generation_matches_training_prefix(smol):
    """The prompt encoded at evaluation time is exactly the masked prefix of the training sample."""
    from leantune.data.prompts import PromptStyle

    demo = Demo(num_train=4, num_val=2)
    style = PromptStyle.from_name("template", smol)
    demo.connect(smol, prompt_style=style, max_seq_length=256)
    demo.setup()
    sample = demo.train_dataset.samples[0]
    record = demo.load_examples()[0][sample.sample_id].record
    prompt_ids = smol.encode(style.render_prompt(record), bos=None)
    ids = sample.input_ids.tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    assert smol.decode(ids[len(prompt_ids):]) == record["output"] + "<|im_end|>"
