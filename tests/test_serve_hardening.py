"""`leantune serve` against abuse, on a loopback server with a tiny model: the Host header (DNS rebinding), the body
size (Content-Length and chunked), undecodable text, adapter names, run-time adapter loading (off without a key,
confined by --adapter_root), adapters that must be refused without allocating (a declared rank far above the saved
tensors', measured as the process's RSS over 20 posts) or without unpickling (a PEFT adapter_model.bin that is not
weights), and a temperature that used to give NaN probabilities among concurrent requests."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pickle
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_support import build_world, one_thread, start_server

KEY = "sk-hardening"
N = 8
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def world(default_checkpoint, tmp_path_factory):
    return build_world(default_checkpoint, tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def keyed(world, tmp_path_factory):
    """A server with an API key (adapter loading on), a 64 KiB body limit, an adapter root and one more host name."""
    root = tmp_path_factory.mktemp("adapter-root")
    engine, srv = start_server(world, 4, 16, 64, adapters=("a",), api_key=KEY, max_body_bytes=64 * 1024,
                               adapter_root=root, allowed_hosts=("api.example",))
    yield engine, srv, root
    srv.close()


def http(srv, **kw) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def chat_body(content, **kw) -> dict:
    return {"model": "tiny", "max_tokens": N, "temperature": 0, "messages": [{"role": "user", "content": content}],
            **kw}


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"}" in out:
                break
        return out


def test_host_header_must_name_this_server(keyed):
    _, srv, _ = keyed
    with http(srv) as c:
        assert c.get("/health").status_code == 200  # 127.0.0.1:port, the bind address
        assert c.get("/health", headers={"Host": f"localhost:{srv.port}"}).status_code == 200  # loopback names
        assert c.get("/v1/models", headers={"Host": "api.example"}).status_code == 200  # --allowed_hosts
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:1", "a:b:c"):
            r = c.post("/v1/chat/completions", json=chat_body("hi"), headers={"Host": host})
            assert r.status_code == 421, (host, r.status_code)
            assert "--allowed_hosts" in error_of(r)["message"]
    out = raw_request(srv.port, b"GET /health HTTP/1.0\r\n\r\n")  # no Host at all
    assert out.startswith(b"HTTP/1.1 400") and b"no Host header" in out


def test_body_limit_refuses_before_reading(keyed):
    _, srv, _ = keyed
    with http(srv) as c:
        big = chat_body("word " * 20_000)  # ~100 KB over the 64 KiB limit
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

        def chunks():  # no Content-Length: chunked transfer, counted as it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 4096):
                yield data[i:i + 4096]
        r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "Content-Length" not in r.request.headers
        small = json.dumps(chat_body("hi")).encode()
        r = c.post("/v1/chat/completions", content=iter([small[:10], small[10:]]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body under the limit is replayed whole
    # a Content-Length over the limit is answered at once: the server never waits for the 1 GB it announces
    t0 = time.perf_counter()
    out = raw_request(srv.port, (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                                 "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{").encode())
    assert out.startswith(b"HTTP/1.1 413") and time.perf_counter() - t0 < 10


def test_undecodable_text_is_a_400(keyed):
    _, srv, _ = keyed
    with http(srv) as c:
        for path, body in [("/v1/chat/completions", chat_body("a\ud800b")),
                           ("/v1/chat/completions", chat_body([{"type": "text", "text": "\udfff"}])),
                           ("/v1/completions", {"model": "tiny", "prompt": ["ok", "\ud83d"], "max_tokens": 2}),
                           ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["\ud800"]}),
                           ("/v1/adapters", {"name": "\ud800", "path": "x"})]:
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, body, r.status_code, r.text)
            assert "not valid Unicode" in error_of(r)["message"]
        r = c.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400  # bytes that are not UTF-8 at all


def test_adapter_names_paths_and_loading_rules(world, keyed):
    engine, srv, root = keyed
    shutil.copytree(world["a"], root / "inside")
    with http(srv) as c:
        for name in ("x" * 129, "has space", "../up", "-x"):
            r = c.post("/v1/adapters", json={"name": name, "path": "inside"})
            assert r.status_code == 400 and error_of(r)["param"] == "name", (name, r.text)
        r = c.post("/v1/adapters", json={"name": "outside", "path": str(world["a"])})
        assert r.status_code == 403 and error_of(r)["code"] == "path_not_allowed"
        r = c.post("/v1/adapters", json={"name": "dotdot", "path": f"../{world['a'].parent.name}/{world['a'].name}"})
        assert r.status_code == 403
        os.symlink(world["a"], root / "link")
        assert c.post("/v1/adapters", json={"name": "link", "path": "link"}).status_code == 403  # resolved
        r = c.post("/v1/adapters", json={"name": "in", "path": "inside"})  # relative to the root
        assert r.status_code == 200, r.text
        assert c.delete("/v1/adapters/in").status_code == 200
    # no API key: loading is off unless --allow_adapter_loading true
    for allow, status in ((None, 403), (False, 403), (True, 200)):
        engine2, srv2 = start_server(world, 1, 4, 8, adapters=(), allow_adapter_loading=allow)
        try:
            r = httpx.post(srv2.url + "/v1/adapters", json={"name": "a2", "path": str(world["a"])}, timeout=60)
            assert r.status_code == status, (allow, r.text)
            if status == 403:
                assert "--allow_adapter_loading" in error_of(r)["message"]
        finally:
            srv2.close()


def peft_folder(world, out: Path, **config) -> Path:
    shutil.copytree(world["b"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return out


def test_a_non_weights_pickle_is_refused_without_running_it(world, keyed, tmp_path):
    _, srv, root = keyed
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = peft_folder(world, root / "evil-peft")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with http(srv) as c:
        r = c.post("/v1/adapters", json={"name": "evil", "path": "evil-peft"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_adapter", r.text
    assert not marker.exists()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)")
def test_refused_adapters_allocate_nothing(world, keyed):
    """Adapters declaring rank 2**18 over rank-2/4 tensors (a leantune manifest and a PEFT adapter_config), posted 20
    times: each is a 400, and the process's RSS, sampled every millisecond, stays within 40 MB of where it started
    (loading them for real would allocate ~240 MB each before the shapes were compared)."""
    _, srv, root = keyed
    leantune_dir = root / "huge-leantune"
    shutil.copytree(world["a"], leantune_dir)
    manifest = json.loads((leantune_dir / "leantune.json").read_text())
    manifest["method_args"]["r"] = 2**18
    manifest["method_args"]["targets"] = ["query", "value"]
    (leantune_dir / "leantune.json").write_text(json.dumps(manifest))
    peft_folder(world, root / "huge-peft", r=2**18)
    posts = [{"name": f"huge{i}", "path": "huge-leantune" if i % 2 else "huge-peft"} for i in range(20)]
    with http(srv) as c:
        assert c.post("/v1/adapters", json=posts[0]).status_code == 400  # warm-up: code paths, caches
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.001)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for body in posts:
                r = c.post("/v1/adapters", json=body)
                assert r.status_code == 400 and error_of(r)["code"] == "invalid_adapter", r.text
        finally:
            done.set()
            sampler.join()
    grown = (max(peak[0], rss_bytes()) - base) / 2**20
    assert grown < 40, f"RSS grew {grown:.0f} MB over 20 refused adapters"


def test_tiny_temperature_is_greedy_and_its_batch_mates_are_unaffected(world, keyed):
    """temperature 1e-40 (valid: in [0, 2]) used to give NaN probabilities and fail the whole step: every concurrent
    client got a 500. Now it is greedy; all five answers equal `generate`'s greedy text."""
    _, srv, _ = keyed
    ref = world["refs"]["tiny"]
    prompts = ["Hello there", "What is 2+2?", "Tell me a story", "Hi", "Sort 3 1 2"]
    temps = [1e-40, 0, 0, 1e-300, 0]
    with http(srv) as c, cf.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda pt: c.post("/v1/chat/completions", json=chat_body(pt[0], temperature=pt[1])),
                                zip(prompts, temps)))
    for p, r in zip(prompts, answers):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref.text(p, N)
