"""`leantune serve` through the real `openai` client against a server on a loopback port started by the test: chat,
streaming, completions, two LoRA adapters (one leantune, one PEFT folder) in interleaved concurrent requests, each
equal to leantune's own `generate` text for that adapter (and the base's for the base name), stop sequences, runtime
adapter loading, back-pressure (429 + Retry-After) and OpenAI-shaped 4xx errors for bad requests."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import openai
import pytest
from serve_support import build_world, one_thread, start_server

KEY = "sk-test-key"
N = 12  # max_tokens of most requests
PROMPTS = ["Hello there", "What is 2+2?", "Sort these numbers: 3 1 2", "Tell me a story about a cat", "Hi"]


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

@pytest.fixture(scope="module")
def world(default_checkpoint, tmp_path_factory):
    return build_world(default_checkpoint, tmp_path_factory.mktemp("serve"))


def start(world, max_batch=4, max_queue=32, default_max_tokens=64, adapters=("a", "b"), api_key=KEY):
    return start_server(world, max_batch, max_queue, default_max_tokens, adapters, api_key)


@pytest.fixture(scope="module")
def server(world):
    engine, srv = start(world)
    yield engine, srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1].url + "/v1", api_key=KEY, max_retries=0)


def chat(client, model, prompt, **kw):
    kw.setdefault("max_tokens", N)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_the_base_and_the_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "a", "b"]
    assert models["a"].model_extra["kind"] == "shared" and models["b"].model_extra["method"] == "lora"
    assert client.models.retrieve("b").id == "b"


def test_interleaved_concurrent_requests_give_each_adapters_own_greedy_text(world, client):
    """Requests for the base, a leantune LoRA and a PEFT LoRA, fired concurrently in interleaved order, share batches;
    each answer equals `generate` with that adapter (and the three differ)."""
    refs = world["refs"]
    jobs = [(name, p) for p in PROMPTS for name in ("a", "tiny", "b")] * 2
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: chat(client, *j), jobs))
    for (name, prompt), r in zip(jobs, answers):
        assert r.choices[0].message.content == refs[name].text(prompt, N), (name, prompt)
        assert r.model == name and r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= N and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    texts = {name: refs[name].text(PROMPTS[0], N) for name in ("a", "tiny", "b")}
    assert len(set(texts.values())) == 3, texts


def test_stream_chunks_add_up_to_the_same_text_with_usage(world, client):
    stream = chat(client, "b", PROMPTS[1], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == world["refs"]["b"].text(PROMPTS[1], N)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert len({c.id for c in chunks}) == 1 and chunks[1].object == "chat.completion.chunk"


def test_completions_send_the_prompt_raw_like_generate_raw(world, client):
    ref = world["refs"]["a"]
    r = client.completions.create(model="a", prompt="Once upon a time", max_tokens=N, temperature=0)
    assert r.choices[0].text == ref.text("Once upon a time", N, raw=True) and r.object == "text_completion"
    streamed = client.completions.create(model="a", prompt="Once upon a time", max_tokens=N, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    ids = ref.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model="a", prompt=ids, max_tokens=N, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_stop_sequences_cut_the_text_before_them(world, client):
    full = world["refs"]["tiny"].text(PROMPTS[2], 32)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    r = chat(client, "tiny", PROMPTS[2], max_tokens=32, stop=[stop, "never-seen-stop"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert expected == world["refs"]["tiny"].text(PROMPTS[2], 32, stop=[stop])  # generate --stop agrees
    streamed = chat(client, "tiny", PROMPTS[2], max_tokens=32, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_seeded_sampling_repeats_and_matches_generate(world, client):
    kw = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=N)
    first = chat(client, "a", PROMPTS[3], **kw).choices[0].message.content
    assert chat(client, "a", PROMPTS[3], **kw).choices[0].message.content == first
    from leantune.decode.generate import Sampling
    assert first == world["refs"]["a"].text(PROMPTS[3], N, sampling=Sampling(0.9, None, 0.95), seed=7)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_shaped_4xx_errors(server, client):
    url = server[1].url
    auth = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        chat(client, "nope", "hi")
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "tiny", "hi " * 300, max_tokens=8)
    assert "maximum context length is 256 tokens" in str(e.value) and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n=2"):
        chat(client, "tiny", "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, "tiny", "hi", temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    cases = [
        ("post", "/v1/chat/completions", {"model": "tiny"}, 400),  # no messages
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                          "max_tokens": 0}, 400),
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                          "stop": ["1", "2", "3", "4", "5"]}, 400),
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
        ("post", "/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400),
        ("post", "/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, 400),
        ("post", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400),
        ("post", "/v1/adapters", {"name": "x", "path": "/does/not/exist"}, 400),
        ("post", "/v1/adapters", {"name": "a", "path": "."}, 409),
        ("delete", "/v1/adapters/tiny", None, 400),
        ("delete", "/v1/adapters/nope", None, 404),
        ("post", "/v1/completions", {"model": "tiny", "prompt": ""}, 400),
        ("get", "/v1/nothing-here", None, 404),
        ("get", "/v1/chat/completions", None, 405),
    ]
    with httpx.Client(base_url=url, headers=auth) as http:
        for method, path, body, status in cases:
            r = http.request(method, path, json=body)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            error_of(r)
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        health = httpx.get(url + "/health")  # open without a key
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_adapters_load_and_unload_at_run_time(world, server, client):
    engine, srv = server
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = http.post("/v1/adapters", json={"name": "c", "path": str(world["c"])})
        assert r.status_code == 200 and r.json()["kind"] == "grouped" and r.json()["method"] == "prefix_tuning"
        jobs = [("c", PROMPTS[0]), ("a", PROMPTS[0]), ("c", PROMPTS[4]), ("tiny", PROMPTS[4])]
        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda j: chat(client, *j).choices[0].message.content, jobs))
        assert answers == [world["refs"][n].text(p, N) for n, p in jobs]
        assert http.post("/v1/adapters", json={"name": "c", "action": "unload"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "c", "hi")
    assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]


def test_a_full_queue_answers_429_with_retry_after(world):
    engine, srv = start(world, max_batch=1, max_queue=1, default_max_tokens=200, adapters=())
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        running = chat(client, "tiny", "a long one", max_tokens=200, stream=True)
        next(iter(running))  # the first request holds the only row
        waiting = threading.Thread(target=lambda: chat(client, "tiny", "second", max_tokens=4))
        waiting.start()
        deadline = time.monotonic() + 10
        while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "third"}]})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert error_of(r)["code"] == "rate_limit_exceeded"
        running.close()  # the client goes away: its row is freed and the waiting request runs
        waiting.join(timeout=30)
        assert not waiting.is_alive()
    finally:
        srv.close()


def test_a_client_that_goes_away_frees_its_row(server, monkeypatch):
    import leantune.serve.app as serve_app

    monkeypatch.setattr(serve_app, "DISCONNECT_POLL_S", 0.01)
    engine, srv = server
    body = {"model": "a", "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me everything"}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth, timeout=60).json()
    assert whole["choices"][0]["finish_reason"] == "length"  # greedy never stops early: only a cancel can end it
    # On an idle machine the tiny model decodes its whole budget before a 50 ms client timeout is noticed, and a
    # finished request is not a cancelled one: slow each decode step so the disconnect comes first.
    decode_step = engine._decode_step

    def slow_step() -> None:
        time.sleep(0.02)
        decode_step()

    monkeypatch.setattr(engine, "_decode_step", slow_step)
    before = engine.stats()["cancelled_requests"]
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed answer the client stops waiting for
        httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth, timeout=0.05)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth) as r:
        next(r.iter_lines())  # a stream closed after its first event
    deadline = time.monotonic() + 10
    while engine.stats()["cancelled_requests"] < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["cancelled_requests"] == before + 2 and engine.stats()["running"] == 0


def test_graceful_shutdown_finishes_the_requests_in_flight(world):
    """SIGTERM while one request streams and another waits for the only row: both still finish whole (the stream
    ends with its last token and [DONE]), the server says so, refuses new connections, and exits with status 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LEANTUNE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", "serve", "--checkpoint_dir", str(world["ckpt"]),
                             "--port", str(port), "--threads", "1", "--max_batch_size", "1",
                             "--adapter", f"a={world['a']}", "--max_new_tokens", "200"],
                            env=env, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {"model": "a", "max_tokens": 200, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
        queued: dict = {}
        second = threading.Thread(target=lambda: queued.update(
            httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=120).json()))
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                          timeout=120) as r:
            for line in r.iter_lines():
                if line and not lines:  # the first request holds the row: queue the second, then SIGTERM
                    second.start()
                    while httpx.get(url + "/health").json()["waiting"] < 1:
                        time.sleep(0.002)
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        second.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log = proc.stderr.read() or ""
    expected = world["refs"]["a"].text("Hi", 200)
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert [x for x in lines if x][-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == expected
    assert queued["choices"][0]["message"]["content"] == expected
    assert "shutting down: finishing 1 running and 1 queued requests" in log, log
    assert "serving tiny" in log and KEY not in log  # the key is never printed
    assert log.count("adapter a:") == 1, log  # each adapter's line once (it was printed and logged)
