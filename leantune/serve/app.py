"""The HTTP layer: a FastAPI app speaking OpenAI's API over the serving engine.

Endpoints: `GET /v1/models` (the base and every adapter), `POST /v1/chat/completions` (the checkpoint's chat
template), `POST /v1/completions` (the prompt as is, as `generate --raw`), both with SSE streaming in OpenAI's chunk
format (`data: {...}` events, then `data: [DONE]`); `GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}` to list,
load and unload adapters at run time; `GET /health`. With an API key every /v1 route needs `Authorization: Bearer`.

Every client mistake is a 4xx in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}): a body that
does not validate is 400 (FastAPI's 422 is mapped), an unknown model 404, a full queue 429 with Retry-After, a prompt
over the context window 400 naming the limit. Before any route runs, `RequestGuard` refuses a `Host` this server does
not answer to (421: DNS rebinding) and a body over the size limit (413, from Content-Length or counted as it arrives).
The engine's thread does the work; each request's events come back through an asyncio queue fed with
`call_soon_threadsafe`. A client that disconnects mid-stream cancels its request.

The routes are plain functions over one `ServeState` (engine and settings) kept in `app.state`. FastAPI itself is
imported in `create_app`, so that every other command starts without it (~0.1 s); the routes' annotations name only
Starlette's Request and the protocol's pydantic models, which cost ~5 ms once torch is loaded. This module has no
`from __future__ import annotations`: FastAPI reads the routes' annotations when they are registered.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from leantune.decode.generate import Sampling, bos_for_rendered
from leantune.serve.engine import ContextOverflow, Engine, QueueFull, ShuttingDown, UnknownModel
from leantune.serve.protocol import (
    AdapterRequest,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)

log = logging.getLogger("leantune.serve")

DISCONNECT_POLL_S = 1.0
"""How often a non-streamed request checks that its client is still connected (a stream notices at once)."""
MAX_BODY_BYTES = 4 * 2**20
"""Default request-body limit (serve --max_body_mb 4): a context window of text or token ids fits many times."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
                 421: "invalid_request_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class ServeSettings:
    """What `leantune serve`'s flags decide for the HTTP layer (see its --help)."""

    api_key: str | None = None
    default_max_tokens: int = 512
    shutdown_timeout: float | None = None
    allow_adapter_loading: bool | None = None
    """None: loading and unloading adapters over HTTP is on exactly when an API key is set."""
    adapter_root: Path | None = None
    """When set, adapters loaded over HTTP must lie inside this folder (relative paths are taken from it)."""
    max_body_bytes: int = MAX_BODY_BYTES
    host: str = "127.0.0.1"
    """The address the server is bound to: `Host` headers are checked against it."""
    allowed_hosts: tuple[str, ...] = ()
    """More names (or IP addresses) clients may call the server by; "*" accepts any Host."""

    @property
    def adapter_loading(self) -> bool:
        return self.allow_adapter_loading if self.allow_adapter_loading is not None else self.api_key is not None


@dataclass
class ServeState:
    """Everything a route needs: the engine (which holds the adapters) and the settings."""

    engine: Engine
    settings: ServeSettings = field(default_factory=ServeSettings)

    def model_card(self, name: str) -> dict:
        a = self.engine.adapters[name]
        return {"id": name, "object": "model", "created": 0, "owned_by": "leantune", "kind": a.kind,
                "method": a.method, "context_length": self.engine.capacity - a.n_virtual}

    def check_loading(self) -> None:
        if not self.settings.adapter_loading:
            raise APIError(403, "loading and unloading adapters at run time is off on this server: start serve with "
                           "--api_key (or LEANTUNE_API_KEY), or with --allow_adapter_loading true",
                           "permission_error", code="adapter_loading_disabled")

    def adapter_path(self, given: str) -> Path:
        """The folder a POST /v1/adapters names; inside --adapter_root when one is set (403 otherwise)."""
        root = self.settings.adapter_root
        if root is None:
            return Path(given)
        path = (root / given).resolve()  # an absolute `given` replaces root; symlinks and .. are resolved
        if not path.is_relative_to(root.resolve()):
            raise APIError(403, f"path: {given!r} is outside the adapter root of this server (serve --adapter_root)",
                           "permission_error", param="path", code="path_not_allowed")
        return path


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


# ---- what runs before any route: Host and body size ------------------------------------------------------------

def host_rule(settings: ServeSettings):
    """A predicate on the Host header's name (port, brackets and a trailing dot removed, lower case): the bind
    address; the loopback names too when bound to loopback; any IP address when bound to every interface (an
    address cannot be a rebound DNS name); plus --allowed_hosts ("*": anything)."""
    bind = settings.host.strip("[]").lower()
    extra = {h.strip("[]").rstrip(".").lower() for h in settings.allowed_hosts}
    if "*" in extra:
        return lambda name: True
    names = {bind, *extra}
    if _is_loopback(bind):
        names.update(LOOPBACK_NAMES)
    wildcard = bind in ("0.0.0.0", "::", "")
    if wildcard:
        names.add("localhost")
    return lambda name: name in names or (wildcard and _is_ip(name))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _is_loopback(name: str) -> bool:
    return name == "localhost" or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)


def host_name(header: str) -> str | None:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'; None when the header is not a host[:port]."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, _, port = header.partition(":")
        if port and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name or None


class RequestGuard:
    """ASGI middleware in front of the app: a request whose Host the server does not answer to gets 421 (400 when
    there is none), a body over `max_body_bytes` gets 413 before it is read (Content-Length) or as soon as the
    counted chunks pass the limit (chunked bodies); the body read here is replayed to the app."""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app, self.limit, self.allowed = app, settings.max_body_bytes, host_rule(settings)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        refusal = self.check_headers(headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if "content-length" in headers or "transfer-encoding" in headers:
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                total += len(body)
                if total > self.limit:
                    return await self.too_large()(scope, receive, send)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)

    def check_headers(self, headers: dict[str, str]) -> Response | None:
        host = headers.get("host")
        if host is None:
            return _error(400, "the request has no Host header", code="missing_host")
        name = host_name(host)
        if name is None or not self.allowed(name):
            shown = host if len(host) <= 80 else host[:80] + "..."
            return _error(421, f"this server does not answer to Host {shown!r}; start serve with --allowed_hosts NAME "
                          "to accept the name clients use", code="host_not_allowed")
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return _error(400, "Content-Length is not a number", code="invalid_request")
            if int(length) > self.limit:
                return self.too_large()
        return None

    def too_large(self) -> Response:
        return _error(413, f"the request body is over {self.limit} bytes, this server's limit (serve --max_body_mb)",
                      code="request_too_large")


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then passes on to the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that echoes a client's odd text (a lone surrogate) still
    encodes, instead of failing the error response itself with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    return SafeJSONResponse(error_body(message, type or _STATUS_TYPES.get(status, "invalid_request_error"), param,
                                       code), status_code=status, headers=headers)


# ---- error handlers ----------------------------------------------------------------------------------------------

async def on_api_error(request: Request, e: APIError) -> Response:
    return SafeJSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_invalid(request: Request, e) -> Response:
    """FastAPI's RequestValidationError (a 422 by default) as OpenAI's 400, naming the first bad field."""
    first = (e.errors() or [{}])[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, param = "the request body is not valid JSON", None
    message = f"{param}: {msg}" if param else msg
    return _error(400, message, param=param, code="invalid_request")


async def on_http_error(request: Request, e) -> Response:
    return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))


async def on_bug(request: Request, e: Exception) -> Response:  # never a client's mistake: those are APIErrors
    log.error("unexpected error on %s: %r", request.url.path, e, exc_info=e)
    return _error(500, f"internal error: {type(e).__name__}", "server_error")


async def authorized(request: Request) -> None:
    api_key = state_of(request).settings.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                       "authentication_error", code="invalid_api_key")


# ---- routes ----------------------------------------------------------------------------------------------------

async def health(request: Request) -> Response:
    engine = state_of(request).engine
    alive = engine.thread.is_alive() and not engine.failure
    body = {"status": "ok" if alive and not engine.closing else ("draining" if alive else "failed"), **engine.stats()}
    return JSONResponse(body, status_code=200 if alive and not engine.closing else 503)


async def list_models(request: Request) -> dict:
    st = state_of(request)
    return {"object": "list",
            "data": [st.model_card(n) for n, a in list(st.engine.adapters.items()) if not a.unloading]}


async def get_model(name: str, request: Request) -> dict:
    st = state_of(request)
    try:
        st.engine.lookup(name)
    except UnknownModel as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    return st.model_card(name)


async def list_adapters(request: Request) -> dict:
    st = state_of(request)
    return {"object": "list", "data": [{**st.model_card(n), "path": str(a.path)}
                                       for n, a in list(st.engine.adapters.items()) if a.path and not a.unloading]}


async def change_adapter(body: AdapterRequest, request: Request) -> dict:
    st = state_of(request)
    st.check_loading()
    if body.action == "unload":
        return await unload_adapter(body.name, request)
    if not body.path:
        raise APIError(400, "path: give the adapter folder to load", param="path")
    path = st.adapter_path(body.path)
    try:
        a = await run_in_threadpool(st.engine.add_adapter, body.name, path)
    except FileExistsError as e:
        raise APIError(409, str(e), "conflict_error", param="name", code="adapter_exists") from None
    except Exception as e:  # noqa: BLE001 - the folder is the client's: whatever it holds is a 400, never a 500
        if not _adapter_error(e):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        param = "name" if str(message).startswith("adapter name") else "path"
        raise APIError(400, f"cannot load {body.path}: {message}", param=param, code="invalid_adapter") from None
    return {**st.model_card(a.name), "path": str(a.path)}


def _adapter_error(e: Exception) -> bool:
    """A failure caused by the adapter folder (bad files, args, shapes, a pickle that is not weights: torch's
    weights-only loader refuses it, nothing in it runs)."""
    return isinstance(e, ValueError | KeyError | OSError | NotImplementedError | pickle.UnpicklingError)


async def unload_adapter(name: str, request: Request) -> dict:
    st = state_of(request)
    st.check_loading()
    try:
        st.engine.remove_adapter(name)
    except UnknownModel as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), param="name") from None
    return {"id": name, "object": "model", "deleted": True}


async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state_of(request)
    tokenizer = st.engine.tokenizer
    check_supported(body)
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                       param="messages")
    messages = [m.as_template_message(i) for i, m in enumerate(body.messages)]
    ids = await run_in_threadpool(render_chat, tokenizer, messages)
    return await respond(st, body, [ids], request, chat=True)


async def completions(body: CompletionRequest, request: Request):
    st = state_of(request)
    engine = st.engine
    check_supported(body)
    prompts = body.prompts()
    if not prompts or len(prompts) > engine.max_queue:
        raise APIError(400, f"prompt: give 1 to {engine.max_queue} prompts", param="prompt")
    vocab = engine.vocab_size
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append(await run_in_threadpool(engine.tokenizer.encode, p))
        elif all(isinstance(t, int) and 0 <= t < vocab for t in p):
            encoded.append(list(p))
        else:
            raise APIError(400, f"prompt: token ids must be integers in [0, {vocab})", param="prompt")
    return await respond(st, body, encoded, request, chat=False)


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
    return tokenizer.encode(text, bos=bos_for_rendered(tokenizer, text))


def check_supported(body) -> None:
    bad = body.unsupported()
    if bad:
        name, value = next(iter(bad.items()))
        raise APIError(400, f"{name}={value!r} is not supported by this server", param=name,
                       code="unsupported_parameter")


# ---- answering: submit, then collect or stream -----------------------------------------------------------------

def submit_all(st: ServeState, body, prompts: list[list[int]], sampling: Sampling, stop: list[str], sink_for,
               chat: bool) -> list:
    """Queue one engine request per prompt; any refusal cancels those already queued and becomes its 4xx/503."""
    engine, reqs = st.engine, []
    try:
        for i, ids in enumerate(prompts):
            reqs.append(engine.submit(body.model, ids, body.budget(), st.settings.default_max_tokens, sampling,
                                      body.seed, stop, sink_for(i)))
    except UnknownModel as e:
        cancel_all(engine, reqs)
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    except ContextOverflow as e:
        cancel_all(engine, reqs)
        raise APIError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") from None
    except QueueFull as e:
        cancel_all(engine, reqs)
        raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        cancel_all(engine, reqs)
        raise APIError(503, str(e), "server_error", code="unavailable") from None
    return reqs


async def respond(st: ServeState, body, prompts: list[list[int]], request: Request, chat: bool):
    try:
        sampling = Sampling(1.0 if body.temperature is None else body.temperature, body.top_k,
                            1.0 if body.top_p is None else body.top_p)
    except ValueError as e:
        raise APIError(400, str(e).replace("--", "")) from None
    stop = body.stop_list()
    if not all(prompts):
        raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink_for(index: int):
        def sink(kind: str, payload) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return sink

    reqs = submit_all(st, body, prompts, sampling, stop, sink_for, chat)
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    if body.stream:
        return StreamingResponse(stream(st.engine, body, reqs, events, rid, created, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, finished = [[] for _ in reqs], [None] * len(reqs)
    try:
        while any(f is None for f in finished):
            try:
                i, kind, payload = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody will read the answer: free the rows
                    return Response(status_code=499)
                continue
            if kind == "text":
                texts[i].append(payload)
            elif kind == "done":
                finished[i] = payload
            else:  # this request's own failure; its batch-mates go on
                raise APIError(500, f"generation failed: {payload}", "server_error", code="generation_failed")
    finally:
        cancel_all(st.engine, reqs)
    choices = []
    for i, (t, f) in enumerate(zip(texts, finished)):
        text = "".join(t)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": f["finish_reason"]})
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": f["finish_reason"]})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": choices, "system_fingerprint": None,
            "usage": usage(sum(f["prompt_tokens"] for f in finished), sum(f["completion_tokens"] for f in finished))}


async def stream(engine: Engine, body, reqs, events: asyncio.Queue, rid: str, created: int,
                 chat: bool) -> AsyncIterator[str]:
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": kind_name, "created": created, "model": body.model,
                                      "system_fingerprint": None, "choices": choices, **extra}) + "\n\n"

    def choice(i: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    finished: list[dict | None] = [None] * len(reqs)
    try:
        if chat:
            yield chunk([choice(i, None, None, first=True) for i in range(len(reqs))])
        while any(f is None for f in finished):
            i, kind, payload = await events.get()
            if kind == "text":
                yield chunk([choice(i, payload, None)])
            elif kind == "done":
                finished[i] = payload
                yield chunk([choice(i, None, payload["finish_reason"])])
            else:
                yield "data: " + json.dumps(error_body(f"generation failed: {payload}", "server_error",
                                                       code="generation_failed")) + "\n\n"
                return
        if body.include_usage():
            yield chunk([], usage=usage(sum(f["prompt_tokens"] for f in finished),
                                        sum(f["completion_tokens"] for f in finished)))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all(engine, reqs)


def cancel_all(engine: Engine, reqs) -> None:
    for r in reqs:
        if not r.done:
            engine.cancel(r)


# ---- the app -----------------------------------------------------------------------------------------------------

ROUTES = [  # (method, path, endpoint, needs the API key)
    ("GET", "/health", health, False),
    ("GET", "/v1/models", list_models, True),
    ("GET", "/v1/models/{name:path}", get_model, True),
    ("GET", "/v1/adapters", list_adapters, True),
    ("POST", "/v1/adapters", change_adapter, True),
    ("DELETE", "/v1/adapters/{name:path}", unload_adapter, True),
    ("POST", "/v1/chat/completions", chat_completions, True),
    ("POST", "/v1/completions", completions, True),
]


def create_app(engine: Engine, settings: ServeSettings | None = None):
    """The app over a running engine, behind `RequestGuard`; closing the app (lifespan shutdown) drains and stops
    the engine. Returns an ASGI app (FastAPI's, wrapped)."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close, settings.shutdown_timeout)

    app = FastAPI(title="leantune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = ServeState(engine, settings)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
    for method, path, endpoint, guarded in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], dependencies=[Depends(authorized)] if guarded else None)
    app.add_middleware(RequestGuard, settings=settings)
    return app
