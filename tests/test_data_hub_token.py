"""HF_TOKEN goes only to the Hub's own https hosts, and never across a redirect to another host (local servers on
127.0.0.1 stand in for the Hub and for "another host": a different port is a different origin)."""

from __future__ import annotations

import http.server
import threading

import pytest

import leantune.data.download as dl
from leantune.data.download import download

BODY = b'[{"instruction": "Hi", "output": "Hello"}]'


class Origin:
    """A local HTTP server that records each request's Authorization header; `redirects` maps path -> location."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None) -> None:
        self.files, self.redirects = files, redirects or {}
        self.seen: list[tuple[str, str | None]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                origin.seen.append((self.path, self.headers.get("Authorization")))
                if self.path in origin.redirects:
                    self.send_response(302)
                    self.send_header("Location", origin.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = origin.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_url_that_merely_mentions_huggingface_gets_no_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with Origin({"/huggingface.co/d.json": BODY}) as other:
        download(f"{other.url}/huggingface.co/d.json?from=huggingface.co", tmp_path / "d.json", retries=1)
    assert (tmp_path / "d.json").read_bytes() == BODY
    assert [auth for _, auth in other.seen] == [None]  # HF_TOKEN was set, the URL names huggingface.co


def test_token_is_not_forwarded_across_a_redirect_to_another_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with Origin({"/d.json": BODY}) as cdn, Origin({}, {"/huggingface.co/d.json": "PLACEHOLDER"}) as hub:
        hub.redirects["/huggingface.co/d.json"] = f"{cdn.url}/d.json"
        # Treat the first local server as the Hub (it gets the token); the second is another host.
        monkeypatch.setattr(dl, "hub_token_for", lambda url: "hf_secret" if url.startswith(hub.url) else None,
                            raising=False)
        download(f"{hub.url}/huggingface.co/d.json", tmp_path / "d.json", retries=1)
    assert (tmp_path / "d.json").read_bytes() == BODY
    assert hub.seen == [("/huggingface.co/d.json", "Bearer hf_secret")]
    assert cdn.seen == [("/d.json", None)]


def test_token_kept_on_a_same_host_redirect(tmp_path, monkeypatch):
    with Origin({"/new/d.json": BODY}, {"/old/d.json": "/new/d.json"}) as hub:
        monkeypatch.setattr(dl, "hub_token_for", lambda url: "hf_secret" if url.startswith(hub.url) else None)
        download(f"{hub.url}/old/d.json", tmp_path / "d.json", retries=1)
    assert hub.seen == [("/old/d.json", "Bearer hf_secret"), ("/new/d.json", "Bearer hf_secret")]


@pytest.mark.parametrize("url, gets_token", [
    ("https://huggingface.co/datasets/x/y/resolve/main/f.json", True),
    ("https://hf.co/datasets/x/y/resolve/main/f.json", True),
    ("https://HuggingFace.co:443/datasets/x/y/resolve/main/f.json", True),
    ("http://huggingface.co/datasets/x/y/resolve/main/f.json", False),  # never in clear text
    ("https://huggingface.co.evil.example/f.json", False),
    ("https://evil.example/huggingface.co/f.json", False),
    ("https://huggingface.co@evil.example/f.json", False),
    ("https://evil.example/?u=https://huggingface.co", False),
    ("https://cdn-lfs.huggingface.co/repos/ab/cd/file", False),  # pre-signed CDN URLs need no token
    ("https://huggingface.co:8443/f.json", False),
    ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json", False),
])
def test_hub_token_for(monkeypatch, url, gets_token):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert dl.hub_token_for(url) == ("hf_secret" if gets_token else None)
    monkeypatch.delenv("HF_TOKEN")
    assert dl.hub_token_for(url) is None
