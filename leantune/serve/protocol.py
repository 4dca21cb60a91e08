"""OpenAI's request and response shapes for the chat and completions endpoints, and its error shape.

Requests are validated by pydantic (a bad body is a 400 in OpenAI's error shape, see app.py); fields leantune does
not implement are refused by name when set to anything but their no-op value (n > 1, logprobs, tools, penalties),
so a client never silently gets something other than what it asked for. Unknown extra fields are ignored, as
OpenAI-compatible servers do. Text that is not valid Unicode (a lone surrogate such as "\ud800", which JSON can
carry but UTF-8 cannot) is refused anywhere in a body with a 400 before the tokenizer or a template sees it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

SEED_LIMIT = 2**63  # torch seeds are 64-bit
MAX_STOP_CHARS = 1000
"""The longest stop string: each decoded token is checked against every prefix of every stop string."""


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def undecodable_text(value: Any, where: str = "body") -> str | None:
    """Where in a parsed JSON value the first string that cannot be UTF-8 encoded sits (e.g. "messages.0.content"),
    or None when all of them can."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(v, dict):
            stack.extend((x, f"{at}.{k}" if isinstance(k, str) and k.isprintable() and k.isascii() else at)
                         for k, x in v.items())
            stack.extend((k, at) for k in v if isinstance(k, str))
        elif isinstance(v, list):
            stack.extend((x, f"{at}.{i}") for i, x in enumerate(v))
    return None


class _Body(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        at = undecodable_text(data)
        if at is not None:
            raise PydanticCustomError("invalid_text", "{at}: text that is not valid Unicode (a lone surrogate such "
                                      "as \\ud800); send UTF-8 text", {"at": at.removeprefix("body.")})
        return data


class _Request(_Body):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    """Not in OpenAI's API (pass it as extra_body): sample among the k most likely tokens."""
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    def unsupported(self) -> dict[str, Any]:
        """The fields set to something this server does not do: {name: value}."""
        bad = {}
        if self.n not in (None, 1):
            bad["n"] = self.n
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                bad[name] = getattr(self, name)
        if self.logit_bias:
            bad["logit_bias"] = self.logit_bias
        if self.logprobs not in (None, False):
            bad["logprobs"] = self.logprobs
        return bad

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop has {len(stops)} sequences; at most 4 are allowed", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: a stop sequence may have at most {MAX_STOP_CHARS} characters", param="stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self, index: int) -> dict[str, str]:
        """{"role", "content"} as chat templates take it; text parts are joined, other parts refused."""
        content = self.content
        if isinstance(content, list):
            other = [p.type for p in content if p.type != "text"]
            if other:
                raise APIError(400, f"messages[{index}].content: only text parts are supported, got {other[0]!r}",
                               param=f"messages.{index}.content")
            content = "".join(p.text or "" for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                bad[name] = "..."
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad["response_format"] = self.response_format.get("type")
        if self.top_logprobs:
            bad["top_logprobs"] = self.top_logprobs
        return bad

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        if self.echo:
            bad["echo"] = True
        if self.best_of not in (None, 1):
            bad["best_of"] = self.best_of
        if self.suffix:
            bad["suffix"] = self.suffix
        return bad

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): one text, several texts, one token list or several token lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def budget(self) -> int | None:
        return self.max_tokens


class AdapterRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str | None = None
    action: Literal["load", "unload"] = "load"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
