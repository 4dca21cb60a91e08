"""Helpers for the data tests: a transparent stub tokenizer (one id per character, special tokens whole)."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

FIXTURES = Path(__file__).parent / "fixtures" / "data"

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class StubTokenizer:
    """Characters map to ord(c) + 100; special tokens (BOS, EOS, chat markers) are single ids below 100."""

    SPECIAL = {"<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "<|eot_id|>": 5, "<|start_header_id|>": 6,
               "<|end_header_id|>": 7, "<|USER|>": 8, "<|ASSISTANT|>": 9, "<|SYSTEM|>": 10}

    def __init__(self, use_bos: bool = True, chat_template: str | None = None, eos_ids: list[int] | None = None,
                 pad_id: int | None = 0) -> None:
        self.bos_id, self.eos_id, self.pad_id, self.use_bos = 1, 2, pad_id, use_bos
        self.eos_ids = eos_ids or [2]
        self.chat_template = chat_template
        self._pattern = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIAL) + ")")
        self._inverse = {v: k for k, v in self.SPECIAL.items()}

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._pattern.split(text)):
            ids += [self.SPECIAL[part]] if i % 2 else [ord(c) + 100 for c in part]
        if (self.use_bos if bos is None else bos) and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids[:max_length] if max_length > 0 else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in (int(x) for x in ids):
            if i in self._inverse:
                out.append("" if skip_special_tokens else self._inverse[i])
            elif i >= 100:
                out.append(chr(i - 100))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def supervised_text(tokenizer, sample) -> str:
    """Decoded text of the target tokens of a sample (what the loss sees), in order."""
    return tokenizer.decode([int(x) for x in sample.labels.tolist() if x != -100])


def targets(sample) -> list[int]:
    """labels with -100 kept, as a list."""
    return [int(x) for x in sample.labels.tolist()]
