"""Downloads against a local HTTP server on 127.0.0.1: resume with Range, checksums, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest
from data_support import FIXTURES

from leantune.data import Alpaca, Dolly
from leantune.data.download import DownloadError, download, ensure_file

BODY = (FIXTURES / "alpaca_data.json").read_bytes()


class Server:
    """Serves `files` with Range support; `cut_first` closes the first response after that many bytes."""

    def __init__(self, files: dict[str, bytes], cut_first: int | None = None, status: int | None = None) -> None:
        self.files, self.cut_first, self.status = files, cut_first, status
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if server.status:
                    self.send_error(server.status)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if server.cut_first is not None and len(server.requests) == 1:
                    chunk = chunk[: server.cut_first]  # connection dies mid-body
                self.wfile.write(chunk)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_records_checksum_and_reuses_cache(tmp_path):
    dest = tmp_path / "alpaca_data.json"
    with Server({"/a.json": BODY}) as srv:
        ensure_file(f"{srv.url}/a.json", dest)
        assert dest.read_bytes() == BODY
        assert (tmp_path / "alpaca_data.json.sha256").read_text().split()[0] == sha(BODY)
        ensure_file(f"{srv.url}/a.json", dest)  # cached: no second request
        assert len(srv.requests) == 1
    dest.write_bytes(BODY.replace(b"Red.", b"Blue"))  # the cache changed behind our back
    with pytest.raises(DownloadError, match="does not match the expected"):
        ensure_file("http://127.0.0.1:9/never", dest)


def test_resume_with_range_after_a_dropped_connection(tmp_path):
    dest = tmp_path / "data.json"
    with Server({"/d.json": BODY}, cut_first=100) as srv:
        download(f"{srv.url}/d.json", dest, sha256=sha(BODY), retries=2)
        assert srv.requests == [("/d.json", None), ("/d.json", "bytes=100-")]
    assert dest.read_bytes() == BODY and not (tmp_path / "data.json.part").exists()


def test_resume_a_part_file_left_by_an_earlier_run(tmp_path):
    dest = tmp_path / "data.json"
    (tmp_path / "data.json.part").write_bytes(BODY[:50])
    with Server({"/d.json": BODY}) as srv:
        download(f"{srv.url}/d.json", dest)
        assert srv.requests == [("/d.json", "bytes=50-")]
    assert dest.read_bytes() == BODY


def test_checksum_mismatch_discards_the_download(tmp_path):
    dest = tmp_path / "data.json"
    with Server({"/d.json": BODY}) as srv, pytest.raises(DownloadError) as e:
        download(f"{srv.url}/d.json", dest, sha256="0" * 64)
    assert "does not match the expected " + "0" * 64 in str(e.value) and sha(BODY) in str(e.value)
    assert not dest.exists() and not (tmp_path / "data.json.part").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_error_says_how_to_use_a_local_file(tmp_path):
    with pytest.raises(DownloadError) as e:
        download(f"http://127.0.0.1:{_closed_port()}/x.json", tmp_path / "x.json", retries=1, timeout=5)
    assert "--data.local_path" in str(e.value) and "--data JSON --data.json_path" in str(e.value)
    with Server({}, status=403) as srv, pytest.raises(DownloadError, match="HF_TOKEN"):
        download(f"{srv.url}/gated.jsonl", tmp_path / "g.jsonl")
    with Server({}) as srv, pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{srv.url}/missing.jsonl", tmp_path / "m.jsonl")


def test_dataset_module_downloads_into_its_cache(tmp_path, monkeypatch):
    dolly = (FIXTURES / "databricks-dolly-15k.jsonl").read_bytes()
    with Server({"/dolly.jsonl": dolly, "/alpaca.json": BODY}) as srv:
        monkeypatch.setattr("leantune.data.dolly.URL", f"{srv.url}/dolly.jsonl")
        monkeypatch.setitem(__import__("leantune.data.alpaca", fromlist=["URLS"]).URLS, "alpaca",
                            (f"{srv.url}/alpaca.json", "alpaca_data.json"))
        train, _ = Dolly(cache_dir=tmp_path).load_examples()
        assert len(train) == 3 and (tmp_path / "dolly" / "databricks-dolly-15k.jsonl").is_file()
        train, _ = Alpaca(cache_dir=tmp_path).load_examples()
        assert len(train) == 4 and train[0].path == str(tmp_path / "alpaca" / "alpaca_data.json")
    shutil.rmtree(tmp_path / "dolly")
    with pytest.raises(DownloadError, match="--data.local_path"):  # server gone: offline
        Dolly(cache_dir=tmp_path).load_examples()


def test_upstream_urls_are_real_hosts():
    from leantune.data import alpaca, dolly, flan, lima, longform

    urls = [u for u, _ in alpaca.URLS.values()] + [dolly.URL, flan.URL, lima.URL, longform.URL]
    assert all(u.startswith(("https://huggingface.co/datasets/", "https://raw.githubusercontent.com/")) for u in urls)
    assert Path(alpaca.URLS["alpaca"][0]).name == "alpaca_data.json"
