"""Prompt styles: rendering, registry, checkpoint detection, and golden token ids on the default tokenizer."""

from __future__ import annotations

import json

import pytest
from data_support import CHATML_TEMPLATE, StubTokenizer

from leantune.data.errors import Skips
from leantune.data.prompts import STYLES, PromptStyle, Segment, TemplateStyle, prompt_style_for_checkpoint
from leantune.data.sft import Example, tokenize_example

RECORD = {"instruction": "Sort ascending: 7 2 9", "input": "", "output": "2 7 9"}
RECORD_INPUT = {"instruction": "Add the numbers.", "input": "3 4", "output": "7"}
ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# style -> (record, prompt text written by hand, reply text written by hand)
GOLDEN = {
    "alpaca": (RECORD, f"{ALPACA_HEAD}\n\n### Instruction:\nSort ascending: 7 2 9\n\n### Response:\n", "2 7 9"),
    "alpaca+input": (RECORD_INPUT, f"{ALPACA_INPUT_HEAD}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n3 4\n\n"
                                   "### Response:\n", "7"),
    "flan": (RECORD_INPUT, f"{ALPACA_HEAD}\n\n### Instruction:\nAdd the numbers.\n\n3 4\n\n### Response:\n", "7"),
    "falcon": (RECORD, "User: Sort ascending: 7 2 9\nAssistant:", " 2 7 9"),
    "llama2-chat": (RECORD, "[INST] Sort ascending: 7 2 9 [/INST]", " 2 7 9"),
    "llama3": (RECORD, "<|start_header_id|>user<|end_header_id|>\n\nSort ascending: 7 2 9<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n", "2 7 9<|eot_id|>"),
    "chatml": (RECORD, "<|im_start|>user\nSort ascending: 7 2 9<|im_end|>\n<|im_start|>assistant\n", "2 7 9<|im_end|>"),
    "phi": (RECORD, "Instruct: Sort ascending: 7 2 9\nOutput:", " 2 7 9"),
    "stablelm-alpha": (RECORD, f"<|SYSTEM|>{STYLES['stablelm-alpha'].default_system}<|USER|>Sort ascending: 7 2 9"
                               "<|ASSISTANT|>", "2 7 9"),
    "template": (RECORD, f"{SMOL_SYSTEM}<|im_start|>user\nSort ascending: 7 2 9<|im_end|>\n<|im_start|>assistant\n",
                 "2 7 9<|im_end|>"),
}


def style_named(key: str, tokenizer) -> PromptStyle:
    return PromptStyle.from_name(key.split("+")[0], tokenizer)


@pytest.mark.parametrize("key", sorted(set(GOLDEN) - {"template"}))  # template: golden test on the real tokenizer
def test_render_prompt_matches_hand_written_text(key):
    record, prompt, reply = GOLDEN[key]
    style = style_named(key, StubTokenizer())
    assert style.render_prompt(record) == prompt
    segments = style.render_sft(record)
    assert segments == [Segment(prompt, False), Segment(reply, True)]


def test_registry_and_aliases():
    assert set(STYLES) == {"alpaca", "flan", "falcon", "llama2-chat", "llama3", "chatml", "phi", "stablelm-alpha"}
    for name in STYLES:
        assert PromptStyle.from_name(name).name == name
    assert PromptStyle.from_name("Llama2").name == "llama2-chat"
    with pytest.raises(ValueError, match="unknown prompt style"):
        PromptStyle.from_name("nope")
    with pytest.raises(ValueError, match="chat template"):
        PromptStyle.from_name("template", StubTokenizer())
    assert isinstance(PromptStyle.from_name("template", StubTokenizer(chat_template=CHATML_TEMPLATE)), TemplateStyle)


def test_stop_strings_and_ids():
    tok = StubTokenizer(eos_ids=[2])
    assert PromptStyle.from_name("chatml").stop_token_ids(tok) == [2, 4]  # EOS + the single-token <|im_end|>
    assert PromptStyle.from_name("llama3").stop_strings == ("<|eot_id|>",)
    assert PromptStyle.from_name("alpaca").stop_token_ids(tok) == [2]  # "### Instruction:" is not one token
    template = TemplateStyle(StubTokenizer(chat_template=CHATML_TEMPLATE, eos_ids=[4]))
    assert template.stop_strings == ("<|im_end|>",)


def _write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_style_for_checkpoint_prefers_template_then_config_never_folder_name(tmp_path):
    with_template = StubTokenizer(chat_template=CHATML_TEMPLATE)
    folder = _write_config(tmp_path / "falcon-7b-instruct", model_type="llama", vocab_size=32000)
    assert prompt_style_for_checkpoint(folder, with_template).name == "template"
    assert prompt_style_for_checkpoint(folder, StubTokenizer()).name == "alpaca"  # folder name is ignored
    assert prompt_style_for_checkpoint(_write_config(tmp_path / "a", model_type="falcon"), StubTokenizer()).name == "falcon"
    assert prompt_style_for_checkpoint(_write_config(tmp_path / "b", model_type="phi"), StubTokenizer()).name == "phi"
    llama3 = _write_config(tmp_path / "c", model_type="llama", vocab_size=128256)
    assert prompt_style_for_checkpoint(llama3, StubTokenizer()).name == "llama3"
    assert prompt_style_for_checkpoint(tmp_path / "missing", None).name == "alpaca"
    assert prompt_style_for_checkpoint(folder, with_template, name="phi").name == "phi"


def test_conversation_segments_per_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    chatml = PromptStyle.from_name("chatml").render_conversation(messages)
    assert chatml == [
        Segment("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("Hello!<|im_end|>", True), Segment("\n", False),
        Segment("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False), Segment("4<|im_end|>", True)]
    template = TemplateStyle(StubTokenizer(chat_template=CHATML_TEMPLATE, eos_ids=[4])).render_conversation(messages)
    assert "".join(s.text for s in template) == "".join(s.text for s in chatml) + "\n"
    assert [s.text for s in template if s.supervised] == ["Hello!<|im_end|>", "4<|im_end|>"]
    alpaca = PromptStyle.from_name("alpaca").render_conversation(messages)
    assert [s for s in alpaca if s.supervised] == [Segment("Hello!", True), Segment("4", True)]
    assert alpaca[0].text.startswith("Be brief.\n\n### Instruction:\nHi")
    # a trailing user turn is the generation prompt
    assert PromptStyle.from_name("chatml").render_chat(messages[:4]).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_template_that_is_not_incremental_is_refused():
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if not add_generation_prompt %}!{% endif %}"
    style = TemplateStyle(StubTokenizer(chat_template=odd))
    with pytest.raises(ValueError, match="incrementally"):
        style.render_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])


# ---- golden token ids on the default model's tokenizer ------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(default_checkpoint):
    from leantune.tokenizer import Tokenizer

    return Tokenizer(default_checkpoint)


def expected_ids(tok, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """Hand-rendered pieces encoded one by one: prompt masked, reply + EOS supervised, labels pre-shifted."""
    p = tok.encode(prompt, bos=None)
    r = tok.encode(reply, bos=False)
    if r[-1] not in tok.eos_ids:
        r = [*r, tok.eos_id]
    return p + r, [-100] * (len(p) - 1) + r + [-100]


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_token_ids_per_style(smol, key):
    record, prompt, reply = GOLDEN[key]
    ids, labels = expected_ids(smol, prompt, reply)
    sample = tokenize_example(Example(record, "golden", 1, 0), style_named(key, smol), smol, 2048, Skips())
    assert sample.input_ids.tolist() == ids
    assert sample.labels.tolist() == labels
    assert sample.labels.tolist()[-2] == smol.eos_id  # EOS is a target
    assert not smol.use_bos  # SmolLM2 adds no BOS: the only id-1 tokens are the template's own <|im_start|>
    assert ids.count(smol.bos_id) == (prompt + reply).count("<|im_start|>")


def test_golden_literal_ids_template(smol):
    """Pinned ids of a tiny demo-like sample, so a tokenizer regression cannot hide behind computed goldens."""
    record = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    style = PromptStyle.from_name("template", smol)
    sample = tokenize_example(Example(record, "golden", 1, 0), style, smol, 2048, Skips())
    ids = sample.input_ids.tolist()
    assert ids[:4] == [1, 9690, 198, 2683]  # <|im_start|> system \n You
    assert ids[-3:] == [198, 37, 2]  # "\n" "5" <|im_end|>
    assert [x for x in sample.labels.tolist() if x != -100] == [37, 2]


def test_multiturn_masking_golden(smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    p1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    a1, sep, p2, a2 = "Hello there!<|im_end|>", "\n", "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>"
    pieces = [(p1, False), (a1, True), (sep, False), (p2, False), (a2, True)]
    ids, is_target = [], []
    for text, sup in pieces:
        enc = smol.encode(text, bos=None if not ids else False)
        ids += enc
        is_target += [sup] * len(enc)
    labels = [ids[t + 1] if is_target[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    for name in ("template", "chatml"):
        sample = tokenize_example(Example({"messages": messages}, "chat", 1, 0), style_named(name, smol), smol, 2048,
                                  Skips())
        assert sample.input_ids.tolist() == ids, name
        assert sample.labels.tolist() == labels, name
        supervised = smol.decode([x for x in sample.labels.tolist() if x != -100])
        assert supervised == "Hello there!<|im_end|>4<|im_end|>"
