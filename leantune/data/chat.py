"""Multi-turn chat data: OpenAI `messages` or ShareGPT `conversations`, JSON or JSON Lines.

Every assistant turn is supervised (with its end-of-turn token); system and user turns are masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.data.base import InstructionDataModule
from leantune.data.errors import RowError
from leantune.data.json_data import data_files
from leantune.data.readers import read_examples
from leantune.data.sft import Example

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
FORMAT_HINT = ('Rows need {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} '
               'or {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}')


def _content(value: object, i: int) -> str:
    if isinstance(value, list):  # OpenAI content parts: keep the text parts
        value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(value, str):
        raise RowError(f"message {i} has no text content", FORMAT_HINT)
    return value


def parse_messages(row: dict) -> list[dict[str, str]]:
    """Normalise one row to [{role, content}] with roles system/user/assistant; RowError when unusable."""
    if isinstance(row.get("messages"), list):
        raw, role_key, text_key = row["messages"], "role", "content"
    elif isinstance(row.get("conversations"), list):
        raw, role_key, text_key = row["conversations"], "from", "value"
    else:
        raise RowError('no "messages" or "conversations" list in this row', FORMAT_HINT)
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"message {i} is not an object", FORMAT_HINT)
        role = ROLES.get(str(m.get(role_key, "")).lower())
        if role is None:
            raise RowError(f'message {i} has unknown role {m.get(role_key)!r}', f"Use one of: {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise RowError(f"message {i} is a system message; only the first message may be one")
        content = _content(m.get(text_key), i)
        if role == "assistant" and not content.strip():
            raise RowError(f"message {i} (assistant) is empty", "Remove the turn or fill it")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("conversation has no assistant turn, so nothing to train on", FORMAT_HINT)
    return out


@dataclass
class Chat(InstructionDataModule):
    """Conversations from a local JSON/JSONL file (or a folder with train/val files), every reply supervised."""

    json_path: Path | None = None
    """A .json list or .jsonl file of conversations, or a folder with train/val files."""
    system_prompt: str | None = None
    """System prompt for conversations that have none (None: the prompt style's default)."""

    def convert(self, row: dict) -> dict:
        """The row's turns exactly as in the file (so errors can name turn i); a default system prompt goes in
        `system`, which the prompt style puts first when the conversation has none of its own."""
        record: dict = {"messages": parse_messages(row)}
        if self.system_prompt:
            record["system"] = self.system_prompt
        return record

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        train, val = data_files(self.json_path)
        hint = '{"messages": [...]}'
        val_examples = read_examples(val, self.convert, self.skips, hint) if val is not None else None
        return read_examples(train, self.convert, self.skips, hint), val_examples
