"""`leantune serve`: an OpenAI-compatible HTTP server over one base and any number of adapters."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Literal

from leantune.commands.flags import check_at_least, check_folder, check_model_flags, check_threads
from leantune.cpu_threads import apply_threads, in_own_thread
from leantune.download import DEFAULT_CHECKPOINT
from leantune.inference import load_for_inference
from leantune.models.kinds import SERVE, kind_of_folder
from leantune.serve.app import ServeSettings, create_app
from leantune.serve.engine import PREFILL_CHUNK, Engine, check_adapter_name
from leantune.serve.seq2seq_engine import Seq2SeqEngine

API_KEY_ENV = "LEANTUNE_API_KEY"


def parse_adapters(specs: list[str] | None) -> dict[str, Path]:
    """--adapter name=DIR (repeatable) -> {name: folder}; a bare DIR is named after its folder."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        name = name.strip()
        if not folder:
            raise ValueError(f"--adapter {spec!r}: give name=DIR (a name and an adapter folder)")
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise ValueError(f"--adapter {spec!r}: {e}") from None
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        check_folder("adapter", folder)
        out[name] = Path(folder)
    return out


def serve(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    adapter: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_new_tokens: int = 512,
    max_seq_length: int | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    shutdown_timeout: float = 300.0,
    allow_adapter_loading: bool | None = None,
    adapter_root: Path | None = None,
    max_body_mb: float = 4.0,
    allowed_hosts: list[str] | None = None,
    prefix_cache: bool = True,
    prefill_chunk: int = PREFILL_CHUNK,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve the base and its adapters over OpenAI's HTTP API (chat/completions, completions, models; SSE streaming).

    Clients pick the base or an adapter by the request's `model`. Concurrent requests decode together (continuous
    batching over --max_batch_size slots); requests for the base and for any LoRA adapters (leantune or PEFT LORA
    folders, QLoRA included) share one batch with per-row adapter selection. Adapters of other methods (DoRA, IA3,
    LoHa, LoKr, AdaLoRA, prompt/P/prefix tuning, LLaMA-Adapter) are served too: their rows batch together, in a
    forward of their own each step. The base is loaded once; no adapter copies it. Ctrl-C (or SIGTERM) stops
    accepting connections and finishes the requests in flight before exiting.

    Args:
        checkpoint_dir: The base model's Hugging Face folder (the default model is imported on first use).
        adapter: An adapter to serve as name=DIR (repeat the flag, or give a list): a leantune adapter folder of any
            method or a PEFT folder. Requests with "model": name use it. More can be loaded at run time with
            POST /v1/adapters {"name": ..., "path": ...}. An encoder-decoder (T5) serves them the same way.
        host: Address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes the server to the network).
            Requests must call the server by this address (the Host header; on loopback also localhost, on 0.0.0.0
            any IP address of the machine): others get 421, which stops DNS-rebinding pages in a browser.
        port: TCP port.
        api_key: Require `Authorization: Bearer <key>` on every /v1 route; also read from the LEANTUNE_API_KEY
            environment variable (preferred: a flag shows in the process list). Never printed.
        model_name: The base's name in requests and /v1/models (default: the checkpoint folder's name).
        max_batch_size: Rows decoded together (the KV cache holds this many sequences).
        max_queue: Requests that may wait for a free row; beyond it requests get 429 with Retry-After.
        max_new_tokens: The completion budget of a request that gives no max_tokens, and the most any request gets.
        max_seq_length: Context window (prompt plus completion) per request (default: the model's); longer
            requests get 400 naming the limit. The KV cache grows as it is used, up to this many tokens per row.
            For an encoder-decoder (T5) it bounds the prompt and the completion each (default: the config's
            n_positions, else 512).
        precision: 32-true, bf16-true, 16-true (default: the fastest safe one for the device).
        quantize: Load the base's linears quantized (the modes `generate --quantize` takes).
        threads: CPU threads for torch (default: one per usable CPU; when the machine is busy at start, OpenMP's
            threads sleep instead of spinning while they wait, so other work cannot stall every op; the choice
            is printed).
        shutdown_timeout: Seconds to wait for requests in flight after Ctrl-C/SIGTERM before cancelling them.
        allow_adapter_loading: Allow loading and unloading adapters over HTTP (POST /v1/adapters, DELETE
            /v1/adapters/NAME), which reads folders on this machine. Default: on with an --api_key, off without
            one (any local process could otherwise make the server read any folder); true turns it on without a
            key, false off even with one.
        adapter_root: Adapters loaded over HTTP must lie inside this folder (paths are resolved, symlinks and ..
            included; a relative path is taken from it); others get 403. Default: any folder.
        max_body_mb: Largest request body in MiB; a bigger one gets 413 before it is read.
        allowed_hosts: More names clients may call the server by (the Host header), e.g. --allowed_hosts
            '[myserver.lan]'; "*" accepts any (behind a proxy that checks it).
        prefix_cache: Reuse the keys and values of a prompt's start that a row already holds for the same
            adapter (the chat template's system message, a shared few-shot preamble) instead of prefilling it again.
        prefill_chunk: Most prompt tokens read per engine turn (chunked prefill, decoder models): between two chunks
            every running row gets its next token, so a long prompt does not stall the others. Smaller chunks wait
            less and read prompts slower (default 128: about two 16-row decode steps on the default model).
        log_level: uvicorn's log level (critical, error, warning, info, debug).
    """
    import uvicorn  # the server stack loads only for this command (so does FastAPI, in create_app)

    check_at_least("max_batch_size", max_batch_size, 1)
    check_at_least("max_queue", max_queue, 1)
    check_at_least("prefill_chunk", prefill_chunk, 1)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_at_least("max_seq_length", max_seq_length, 2, allow_none=True)
    check_at_least("port", port, 0)
    if port > 65535:
        raise ValueError(f"--port must be <= 65535, got {port}")
    if not 0 <= shutdown_timeout < math.inf:  # `not` also refuses NaN
        raise ValueError(f"--shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout}")
    if not 0 < max_body_mb < 2**20:  # `not` also refuses NaN
        raise ValueError(f"--max_body_mb must be a size in MiB > 0, got {max_body_mb}")
    check_folder("adapter_root", adapter_root)
    hosts = tuple(h.strip() for h in allowed_hosts or ())
    if not all(hosts):
        raise ValueError("--allowed_hosts: give host names (or \"*\"), not empty strings")
    check_threads(threads)
    check_model_flags(precision, None)  # --quantize is checked by loading, which knows every decode mode
    adapters = parse_adapters(adapter)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api_key is empty: give a key or leave it out")
    print(f"[threads: {apply_threads(threads).describe()}]", file=sys.stderr)
    kind = kind_of_folder(checkpoint_dir)
    kind.check(SERVE)
    engine_class = Seq2SeqEngine if kind.seq2seq else Engine  # the one place the model kind picks the engine
    # loaded in a thread that ends, so that the engine thread's OpenMP pool is the only one (cpu_threads.in_own_thread)
    model, tokenizer, precision, _ = in_own_thread(load_for_inference, checkpoint_dir, precision, None, quantize)
    name = model_name or Path(checkpoint_dir).name
    if name in adapters:
        raise ValueError(f"--adapter {name}: that is the base model's name; pick another (or set --model_name)")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    engine = engine_class(model, tokenizer, checkpoint_dir, name, max_batch=max_batch_size, max_queue=max_queue,
                          max_seq_length=max_seq_length, prefix_cache=prefix_cache,
                          **({} if kind.seq2seq else {"prefill_chunk": prefill_chunk}))  # T5 reads its prompt whole
    try:
        for n, folder in adapters.items():
            engine.add_adapter(n, folder)  # the engine logs one line for each
    except BaseException:
        engine.close(timeout=0)
        raise
    settings = ServeSettings(api_key=api_key, default_max_tokens=max_new_tokens, shutdown_timeout=shutdown_timeout,
                             allow_adapter_loading=allow_adapter_loading, adapter_root=adapter_root,
                             max_body_bytes=int(max_body_mb * 2**20), host=host, allowed_hosts=hosts)
    app = create_app(engine, settings)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use it"
              + (" and load adapters from this machine's folders" if settings.adapter_loading else ""),
              file=sys.stderr)
    print(f"serving {name} ({precision}{', ' + quantize if quantize else ''}, context {engine.capacity} tokens, "
          f"{max_batch_size} rows) on http://{host}:{port}/v1"
          + ("; an API key is required (Authorization: Bearer)" if api_key else ""), file=sys.stderr)
    server = _server_class()(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    timeout_graceful_shutdown=shutdown_timeout), engine)
    # after draining, uvicorn re-raises the signal it caught: SIGTERM then ends the process with status 0
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, after the requests in flight finished
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, saying on Ctrl-C/SIGTERM how many requests it finishes before exiting."""

        def __init__(self, config, engine) -> None:
            super().__init__(config)
            self.engine = engine

        async def shutdown(self, sockets=None) -> None:
            s = self.engine.stats()
            if s["running"] or s["waiting"]:
                print(f"shutting down: finishing {s['running']} running and {s['waiting']} queued requests "
                      "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            await super().shutdown(sockets)

    return Server
