"""The HTTP layer: a FastAPI app speaking OpenAI's API over the serving engine.

Endpoints: `GET /v1/models` (the base and every adapter), `POST /v1/chat/completions` (the checkpoint's chat
template), `POST /v1/completions` (the prompt as is, as `generate --raw`), both with SSE streaming in OpenAI's chunk
format (`data: {...}` events, then `data: [DONE]`); `GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}` to list,
load and unload adapters at run time; `GET /health`. With an API key every /v1 route needs `Authorization: Bearer`.

Every client mistake is a 4xx in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}): a body that
does not validate is 400 (FastAPI's 422 is mapped), an unknown model 404, a full queue 429 with Retry-After, a prompt
over the context window 400 naming the limit. The engine's thread does the work; each request's events come back
through an asyncio queue fed with `call_soon_threadsafe`. A client that disconnects mid-stream cancels its request.
"""

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 409: "conflict_error", 429: "rate_limit_error"}


def create_app(engine: Engine, api_key: str | None = None, default_max_tokens: int = 512,
               shutdown_timeout: float | None = None, load_adapters: bool = True) -> "FastAPI":  # noqa: F821
    """The app over a running engine; closing the app (lifespan shutdown) drains and stops the engine.
    `load_adapters` False refuses loading and unloading adapters over HTTP (403).

    FastAPI is imported here, not at the top, so that every other command starts without it (0.4 s); this module
    has no `from __future__ import annotations` because FastAPI reads the endpoints' annotations, which name these
    local imports, when each endpoint is defined."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.close, shutdown_timeout)

    app = FastAPI(title="leantune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        message = f"{param}: {msg}" if param else msg
        return JSONResponse(error_body(message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), _STATUS_TYPES.get(e.status_code, "invalid_request_error")),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # never a client's mistake: those are APIErrors above
        log.error("unexpected error on %s: %r", request.url.path, e, exc_info=e)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                           "authentication_error", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health():
        alive = engine.thread.is_alive() and not engine.failure
        body = {"status": "ok" if alive and not engine.closing else ("draining" if alive else "failed"),
                **engine.stats()}
        return JSONResponse(body, status_code=200 if alive and not engine.closing else 503)

    def model_card(name: str) -> dict:
        a = engine.adapters[name]
        return {"id": name, "object": "model", "created": 0, "owned_by": "leantune", "kind": a.kind,
                "method": a.method, "context_length": engine.capacity - a.n_virtual}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [model_card(n) for n, a in list(engine.adapters.items()) if not a.unloading]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str):
        try:
            engine.lookup(name)
        except UnknownModel as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        return model_card(name)

    @app.get("/v1/adapters", dependencies=guarded)
    async def adapters():
        return {"object": "list", "data": [{**model_card(n), "path": str(a.path)}
                                           for n, a in list(engine.adapters.items()) if a.path and not a.unloading]}

    @app.post("/v1/adapters", dependencies=guarded)
    async def change_adapter(body: AdapterRequest):
        check_loading()
        if body.action == "unload":
            return await unload(body.name)
        if not body.path:
            raise APIError(400, "path: give the adapter folder to load", param="path")
        try:
            a = await run_in_threadpool(engine.add_adapter, body.name, Path(body.path))
        except FileExistsError as e:
            raise APIError(409, str(e), "conflict_error", param="name", code="adapter_exists") from None
        except (ValueError, KeyError, OSError, NotImplementedError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise APIError(400, f"cannot load {body.path}: {message}", param="path", code="invalid_adapter") from None
        return {**model_card(a.name), "path": str(a.path)}

    @app.delete("/v1/adapters/{name:path}", dependencies=guarded)
    async def unload(name: str):
        check_loading()
        try:
            engine.remove_adapter(name)
        except UnknownModel as e:
            raise APIError(404, str(e), param="name", code="model_not_found") from None
        except ValueError as e:
            raise APIError(400, str(e), param="name") from None
        return {"id": name, "object": "model", "deleted": True}

    def check_loading() -> None:
        if not load_adapters:
            raise APIError(403, "loading and unloading adapters is turned off on this server (serve --load_adapters "
                           "false)", "permission_error", code="adapter_loading_disabled")

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatCompletionRequest, request: Request):
        check_supported(body)
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        messages = [m.as_template_message(i) for i, m in enumerate(body.messages)]
        ids = await run_in_threadpool(render_chat, messages)
        return await respond(body, [ids], request, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        check_supported(body)
        prompts = body.prompts()
        if not prompts or len(prompts) > engine.max_queue:
            raise APIError(400, f"prompt: give 1 to {engine.max_queue} prompts", param="prompt")
        vocab = engine.pristine.config.padded_vocab_size
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append(await run_in_threadpool(tokenizer.encode, p))
            elif all(isinstance(t, int) and 0 <= t < vocab for t in p):
                encoded.append(list(p))
            else:
                raise APIError(400, f"prompt: token ids must be integers in [0, {vocab})", param="prompt")
        return await respond(body, encoded, request, chat=False)

    def render_chat(messages: list[dict]) -> list[int]:
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

    async def respond(body, prompts: list[list[int]], request: Request, chat: bool):
        try:
            sampling = Sampling(1.0 if body.temperature is None else body.temperature, body.top_k,
                                1.0 if body.top_p is None else body.top_p)
        except ValueError as e:
            raise APIError(400, str(e).replace("--", "")) from None
        stop = body.stop_list()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(index: int):
            def sink(kind: str, payload) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass
            return sink

        if not all(prompts):
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        reqs = []
        try:
            for i, ids in enumerate(prompts):
                reqs.append(engine.submit(body.model, ids, body.budget(), default_max_tokens, sampling, body.seed,
                                          stop, sink_for(i)))
        except UnknownModel as e:
            cancel_all(reqs)
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        except ContextOverflow as e:
            cancel_all(reqs)
            raise APIError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") \
                from None
        except QueueFull as e:
            cancel_all(reqs)
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            cancel_all(reqs)
            raise APIError(503, str(e), "server_error", code="unavailable") from None
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if body.stream:
            return StreamingResponse(stream(body, reqs, events, rid, created, chat), media_type="text/event-stream",
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
                else:
                    raise APIError(500, f"generation failed: {payload}", "server_error")
        finally:
            cancel_all(reqs)
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
                "usage": usage(sum(f["prompt_tokens"] for f in finished),
                               sum(f["completion_tokens"] for f in finished))}

    async def stream(body, reqs, events: asyncio.Queue, rid: str, created: int, chat: bool) -> AsyncIterator[str]:
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
                    yield "data: " + json.dumps(error_body(f"generation failed: {payload}", "server_error")) + "\n\n"
                    return
            if body.include_usage():
                yield chunk([], usage=usage(sum(f["prompt_tokens"] for f in finished),
                                            sum(f["completion_tokens"] for f in finished)))
            yield "data: [DONE]\n\n"
        finally:
            cancel_all(reqs)

    def cancel_all(reqs) -> None:
        for r in reqs:
            if not r.done:
                engine.cancel(r)

    return app
