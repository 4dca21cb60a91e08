"""Prompt styles: how a record or a conversation becomes model text, and which spans of it are supervised.

A style renders to a list of `Segment(text, supervised)` so masking is exact per turn: the tokenizer encodes the
segments one by one, and only assistant replies (with their end-of-turn marker) are trained on. Prompt text at
inference (`render_prompt`) is byte-identical to the unsupervised prefix used in training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from leantune.models.decoder.families import default_prompt_style


class Segment(NamedTuple):
    text: str
    supervised: bool


def user_content(record: Mapping[str, Any]) -> str:
    """Instruction and optional input as one user message (styles without an input slot use this)."""
    instruction, extra = record.get("instruction", ""), record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def to_messages(record: Mapping[str, Any], with_output: bool = True) -> list[dict[str, str]]:
    """A record as chat messages: `messages` as given, or system/user(/assistant) from instruction fields."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
        if record.get("system") and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages.append({"role": "user", "content": user_content(record)})
    if with_output and "output" in record:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


class PromptStyle:
    """A named prompt format. Subclasses fill in `turn_prompt` and a few class constants."""

    name: ClassVar[str] = ""
    stop_strings: Sequence[str] = ()
    """Text that ends a reply besides the tokenizer's EOS (for generation)."""
    default_system: ClassVar[str | None] = None
    response_prefix: ClassVar[str] = ""
    """Put before every reply (e.g. the space after `Assistant:`), supervised with it."""
    assistant_end: ClassVar[str] = ""
    """End-of-turn text after a reply (e.g. `<|im_end|>`), supervised; "" means the tokenizer's EOS token."""
    turn_separator: ClassVar[str] = ""
    """Unsupervised text between a reply and the next user turn."""

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        """Text of one user turn up to where the reply starts (system text only on the first turn)."""
        raise NotImplementedError

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        """The single-turn prompt for a record (instruction, optional input and system); generation starts after it."""
        return self.turn_prompt(user_content(record), record.get("system") or self.default_system, True)

    def render_sft(self, record: Mapping[str, Any]) -> list[Segment]:
        """Training text of a record: prompt (masked) and reply (supervised); conversations per turn."""
        if "messages" in record:
            return self.render_conversation(to_messages(record))
        reply = self.response_prefix + record["output"] + self.assistant_end
        return [Segment(self.render_prompt(record), False), Segment(reply, True)]

    def render_conversation(self, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
        """Segments of a conversation: user turns and separators masked, assistant replies supervised.

        A trailing user turn renders as the generation prompt (what `render_chat` uses at inference).
        """
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        segments: list[Segment] = []
        first = True
        for m in messages:
            if m["role"] == "assistant":
                segments.append(Segment(self.response_prefix + m["content"] + self.assistant_end, True))
                segments.append(Segment(self.turn_separator, False))
            else:
                segments.append(Segment(self.turn_prompt(m["content"], system, first), False))
                first = False
        if segments and segments[-1] == Segment(self.turn_separator, False):
            segments.pop()  # the sample ends with the last reply
        return [s for s in segments if s.text]

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Prompt text of a conversation ending with a user turn, for generation."""
        return "".join(s.text for s in self.render_conversation(messages))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """The tokenizer's EOS ids plus any stop string that is a single token."""
        ids = list(tokenizer.eos_ids)
        for s in self.stop_strings:
            enc = tokenizer.encode(s, bos=False)
            if len(enc) == 1:
                ids.append(enc[0])
        return list(dict.fromkeys(ids))

    @classmethod
    def from_name(cls, name: str, tokenizer: Any = None) -> PromptStyle:
        """A style by its registry name; `template` needs the tokenizer whose chat template it renders."""
        key = _ALIASES.get(name.lower(), name.lower())
        if key == "template":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("prompt style 'template' needs a checkpoint whose tokenizer has a chat template; "
                                 f"pick one of: {', '.join(STYLES)}")
            return TemplateStyle(tokenizer)
        if key not in STYLES:
            raise ValueError(f"unknown prompt style {name!r}; known styles: {', '.join([*STYLES, 'template'])}")
        return STYLES[key]()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Alpaca(PromptStyle):
    """Stanford Alpaca, with a separate input section when the record has one."""

    name = "alpaca"
    stop_strings = ("### Instruction:",)
    turn_separator = "\n\n"
    PREAMBLE: ClassVar[str] = ("Below is an instruction that describes a task. "
                               "Write a response that appropriately completes the request.")
    PREAMBLE_INPUT: ClassVar[str] = ("Below is an instruction that describes a task, paired with an input that "
                                     "provides further context. Write a response that appropriately completes the "
                                     "request.")

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        head = f"{system or self.PREAMBLE}\n\n" if first else ""
        return f"{head}### Instruction:\n{content}\n\n### Response:\n"

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        extra = record.get("input") or ""
        if not extra.strip():
            return self.turn_prompt(record["instruction"], record.get("system"), True)
        head = record.get("system") or self.PREAMBLE_INPUT
        return f"{head}\n\n### Instruction:\n{record['instruction']}\n\n### Input:\n{extra}\n\n### Response:\n"


class FLAN(Alpaca):
    """FLAN as LitGPT formats it: Alpaca's no-input template, the input appended to the instruction."""

    name = "flan"

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        return self.turn_prompt(user_content(record), record.get("system"), True)


class Falcon(PromptStyle):
    """Falcon-instruct: `User: ...` / `Assistant: ...` lines."""

    name = "falcon"
    stop_strings = ("\nUser:",)
    response_prefix = " "
    turn_separator = "\n"

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        head = f"{system}\n" if first and system else ""
        return f"{head}User: {content}\nAssistant:"


class Llama2Chat(PromptStyle):
    """Llama 2 chat `[INST]` format; turns are separated by EOS only (one BOS per sample)."""

    name = "llama2-chat"
    response_prefix = " "

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
        return f"[INST] {sys}{content} [/INST]"


class Llama3(PromptStyle):
    """Llama 3 instruct headers; a reply ends with `<|eot_id|>`."""

    name = "llama3"
    stop_strings = ("<|eot_id|>",)
    assistant_end = "<|eot_id|>"

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        sys = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if first and system else ""
        return (f"{sys}<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")


class ChatML(PromptStyle):
    """ChatML (`<|im_start|>role ... <|im_end|>`), used by SmolLM2, Qwen and others."""

    name = "chatml"
    stop_strings = ("<|im_end|>",)
    assistant_end = "<|im_end|>"
    turn_separator = "\n"

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        sys = f"<|im_start|>system\n{system}<|im_end|>\n" if first and system else ""
        return f"{sys}<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


class Phi(PromptStyle):
    """Phi-2 `Instruct: ... / Output: ...`."""

    name = "phi"
    stop_strings = ("\nInstruct:",)
    response_prefix = " "
    turn_separator = "\n"

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        head = f"{system}\n" if first and system else ""
        return f"{head}Instruct: {content}\nOutput:"


class StableLMAlpha(PromptStyle):
    """StableLM-Tuned-Alpha with its published system prompt."""

    name = "stablelm-alpha"
    stop_strings = ("<|USER|>", "<|SYSTEM|>")
    default_system = (
        "# StableLM Tuned (Alpha version)\n- StableLM is a helpful and harmless open-source AI language model "
        "developed by StabilityAI.\n- StableLM is excited to be able to help the user, but will refuse to do "
        "anything that could be considered harmful to the user.\n- StableLM is more than just an information "
        "source, StableLM is also able to write poetry, short stories, and make jokes.\n- StableLM will refuse "
        "to participate in anything that could harm a human."
    )

    def turn_prompt(self, content: str, system: str | None, first: bool) -> str:
        sys = f"<|SYSTEM|>{system}" if first and system else ""
        return f"{sys}<|USER|>{content}<|ASSISTANT|>"


class TemplateStyle(PromptStyle):
    """The checkpoint's own Jinja chat template (tokenizer.apply_chat_template).

    Per-turn spans are found by rendering growing prefixes of the conversation: the text added by an assistant
    message, up to and including its end-of-turn token, is supervised; everything else is masked.
    """

    name = "template"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ends = [tokenizer.decode([i]) for i in tokenizer.eos_ids]
        self.stop_strings = tuple(e for e in dict.fromkeys(ends) if e)

    def _apply(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt)

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        return self._apply(to_messages(record, with_output=False), True)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self._apply(messages, True)

    def render_sft(self, record: Mapping[str, Any]) -> list[Segment]:
        return self.render_conversation(to_messages(record))

    def render_conversation(self, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = self._apply(messages[:i], True), self._apply(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("this checkpoint's chat template does not render conversations incrementally, so "
                                 "reply spans cannot be masked exactly; pass a named --prompt_style (e.g. chatml)")
            reply = full[len(prompt):]
            cut = self._end_of_turn(reply)
            segments += [Segment(prompt[len(done):], False), Segment(reply[:cut], True), Segment(reply[cut:], False)]
            done = full
        return [s for s in segments if s.text]

    def _end_of_turn(self, reply: str) -> int:
        """Index just past the last end-of-turn string in a rendered reply (whole reply when there is none)."""
        best = -1
        for end in self.stop_strings:
            k = reply.rfind(end)
            if k >= 0:
                best = max(best, k + len(end))
        return best if best >= 0 else len(reply)


STYLES: dict[str, type[PromptStyle]] = {
    s.name: s for s in (Alpaca, FLAN, Falcon, Llama2Chat, Llama3, ChatML, Phi, StableLMAlpha)
}
_ALIASES = {"llama2": "llama2-chat", "llama-2-chat": "llama2-chat", "llama-3": "llama3", "phi-2": "phi",
            "phi2": "phi", "stablelm": "stablelm-alpha", "chat_template": "template"}


def prompt_style_for_checkpoint(checkpoint_dir: str | Path | None, tokenizer: Any = None,
                                name: str | PromptStyle | None = None) -> PromptStyle:
    """The style to train/prompt a checkpoint with: `name` if given, else its chat template, else config.json
    facts (`model_type`, Llama 3's 128k vocabulary), else Alpaca."""
    if isinstance(name, PromptStyle):
        return name
    if name:
        return PromptStyle.from_name(name, tokenizer)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return TemplateStyle(tokenizer)
    config: dict[str, Any] = {}
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "config.json").is_file():
        config = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    style = default_prompt_style(config)  # config.json facts, per the family table (never the folder name)
    return STYLES[style]() if style else Alpaca()
