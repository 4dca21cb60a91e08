"""`download`: hub downloads through huggingface_hub against a local imitation of the Hub's HTTP endpoints (no
network), the offline error, and imports of local GGUF files and HF folders."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from huggingface_hub import constants as hub_constants

from leantune import download as dl
from leantune.checkpoint.io import load_safetensors, save_safetensors
from leantune.commands.download import download as download_command
from leantune.download import (
    DEFAULT_REPO_ID,
    HubUnreachableError,
    download,
    download_list,
    is_complete,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _st_bytes(tmp_path, name, value):
    p = tmp_path / f"src-{name}"
    save_safetensors({"w": torch.full((2, 2), float(value))}, p)
    return p.read_bytes()


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints huggingface_hub's snapshot_download / list_repo_files use."""

    repos: dict[str, dict[str, bytes]] = {}
    log: list[tuple[str, str, str | None]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", headers=None, head=False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head):
        path = unquote(urlparse(self.path).path)
        self.log.append((self.command, path, self.headers.get("authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            files = self.repos.get(repo_id)
            if files is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            if not rest or rest[0] == "revision":
                info = {"id": repo_id, "modelId": repo_id, "sha": SHA, "private": False,
                        "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            if rest[0] == "tree":
                tree = [{"type": "file", "oid": hashlib.sha1(b).hexdigest(), "size": len(b), "path": f}
                        for f, b in files.items()]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.repos.get(repo_id)
            if files is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            if filename not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            body = files[filename]
            return self._send(200, body, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, head)
        return self._send(404, b"", {}, head)

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    FakeHub.repos, FakeHub.log = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield FakeHub, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _base_files(tmp_path):
    return {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
            "generation_config.json": b'{"eos_token_id": 2}', "README.md": b"# readme", "merges.txt": b"a b",
            "original/params.json": b"{}", ".gitattributes": b"*.safetensors filter=lfs"}


def _downloaded(log):
    return {"GET " + p.split("/resolve/" + SHA + "/")[-1] for m, p, _ in log if m == "GET" and "/resolve/" in p}


def test_hub_download_prefers_safetensors(tmp_path, hub):
    server, url = hub
    files = {**_base_files(tmp_path), "model.safetensors": _st_bytes(tmp_path, "m", 1),
             "pytorch_model.bin": b"pickle!", "training_args.bin": b"pickle!"}
    server.repos["org/tiny"] = files
    out = download("org/tiny", tmp_path / "checkpoints", access_token="hf_secret", endpoint=url)
    assert out == tmp_path / "checkpoints" / "org" / "tiny"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    assert torch.equal(load_safetensors(out / "model.safetensors")["w"], torch.ones(2, 2))
    assert (out / "config.json").read_bytes() == files["config.json"]
    fetched = _downloaded(server.log)
    assert "GET model.safetensors" in fetched and not any(".bin" in f or "original" in f for f in fetched)
    assert any(auth == "Bearer hf_secret" for _, _, auth in server.log)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "org").iterdir()) == ["tiny"]  # staging cleaned up
    assert is_complete(out)
    n = len(server.log)
    assert download("org/tiny", tmp_path / "checkpoints", endpoint=url) == out and len(server.log) == n  # no refetch
    download("org/tiny", tmp_path / "checkpoints", endpoint=url, force=True)
    assert len(server.log) > n


def test_hub_download_sharded_index(tmp_path, hub):
    server, url = hub
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    server.repos["org/sharded"] = {
        **_base_files(tmp_path), "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": _st_bytes(tmp_path, "a", 1),
        "model-00002-of-00002.safetensors": _st_bytes(tmp_path, "b", 2),
        "consolidated.safetensors": b"not needed", "pytorch_model.bin.index.json": b"{}"}
    out = download("org/sharded", tmp_path / "ck", endpoint=url)
    names = sorted(p.name for p in out.iterdir())
    assert "consolidated.safetensors" not in names and "pytorch_model.bin.index.json" not in names
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= set(names)
    assert is_complete(out)


def test_hub_download_bin_fallback(tmp_path, hub):
    server, url = hub
    server.repos["org/old"] = {**_base_files(tmp_path), "pytorch_model.bin": b"weights", "training_args.bin": b"x"}
    out = download("org/old", tmp_path / "ck", endpoint=url)
    assert (out / "pytorch_model.bin").read_bytes() == b"weights" and not (out / "training_args.bin").exists()


def test_hub_repo_without_weights_or_missing(tmp_path, hub):
    server, url = hub
    server.repos["org/empty"] = _base_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        download("org/empty", tmp_path / "ck", endpoint=url)
    with pytest.raises(FileNotFoundError, match="'org/nope' was not found on the Hugging Face Hub"):
        download("org/nope", tmp_path / "ck", endpoint=url)
    assert not (tmp_path / "ck" / "org" / "empty").exists()


def test_hub_unreachable_gives_one_clear_error(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubUnreachableError) as info:
        download("org/tiny", tmp_path / "ck", endpoint=f"http://127.0.0.1:{port}")
    msg = str(info.value)
    assert "Could not reach the Hugging Face Hub" in msg and "'org/tiny'" in msg
    assert "leantune download path/to/model.gguf" in msg and "path/to/hf_model_folder" in msg
    assert not (tmp_path / "ck" / "org" / "tiny").exists()


def test_hub_offline_mode_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="offline mode"):
        download("org/tiny", tmp_path / "ck", endpoint="http://127.0.0.1:9")


# ---- local sources -----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_convert(monkeypatch):
    """Record GGUF conversions instead of running them (the conversion itself is tested in test_gguf_import)."""
    calls = []

    def convert(gguf_path, out_dir, dtype=torch.float32):
        calls.append((gguf_path, out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (out_dir / name).write_text("{}")
        return out_dir

    monkeypatch.setattr("leantune.checkpoint.gguf.gguf_to_hf", convert)
    return calls


def test_default_alias_converts_bundled_gguf(tmp_path, fake_convert):
    from leantune.checkpoint.gguf import default_gguf_path

    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", DEFAULT_REPO_ID):
        out = download(name, tmp_path / "ck")
        assert out == tmp_path / "ck" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    assert fake_convert == [(default_gguf_path(), out)]  # converted once, then reused
    download("smollm2-135m-instruct", tmp_path / "ck", force=True)
    assert len(fake_convert) == 2


def test_local_gguf_file(tmp_path, fake_convert):
    g = tmp_path / "My-Model.Q8_0.gguf"
    g.write_bytes(b"GGUF")
    assert download(str(g), tmp_path / "ck") == tmp_path / "ck" / "My-Model.Q8_0"
    assert fake_convert == [(g, tmp_path / "ck" / "My-Model.Q8_0")]
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        download(str(tmp_path / "weights.pt"), tmp_path / "ck")


def _hf_folder(d, safetensors=True, bin_=True):
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "README.md").write_text("# hi")
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")
    if safetensors:
        save_safetensors({"w": torch.ones(2)}, d / "model.safetensors")
    if bin_:
        torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    return d


def test_local_hf_folder(tmp_path):
    src = _hf_folder(tmp_path / "my-model")
    out = download(str(src), tmp_path / "ck")
    assert out == tmp_path / "ck" / "my-model"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    bin_only = download(str(_hf_folder(tmp_path / "old-model", safetensors=False)), tmp_path / "ck")
    assert (bin_only / "pytorch_model.bin").is_file()
    assert download(str(out), tmp_path / "ck") == out  # importing a folder onto itself is a no-op
    nothing = tmp_path / "no-weights"
    nothing.mkdir()
    (nothing / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model weights"):
        download(str(nothing), tmp_path / "ck")


def test_local_sharded_folder_with_missing_shard(tmp_path):
    src = _hf_folder(tmp_path / "sharded", safetensors=False, bin_=False)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_safetensors({"a": torch.ones(1)}, src / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        download(str(src), tmp_path / "ck")
    save_safetensors({"b": torch.ones(1)}, src / "model-00002-of-00002.safetensors")
    assert is_complete(download(str(src), tmp_path / "ck"))


def test_a_weight_index_naming_files_outside_its_folder_is_refused(tmp_path):
    """An index whose weight_map names `../secret.safetensors` would copy a file from outside the source folder and
    write it outside the import folder: refused, naming the index, and nothing is written."""
    src = _hf_folder(tmp_path / "evil", safetensors=False, bin_=False)
    secret = tmp_path / "secret.safetensors"
    save_safetensors({"a": torch.ones(1)}, secret)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(ValueError, match="not plain file names"):
        download(str(src), tmp_path / "ck" / "x")
    assert not (tmp_path / "ck" / "x" / "evil").exists() and not list(tmp_path.glob("ck/**/*.safetensors"))
    assert not is_complete(src)


def test_unknown_name_is_not_sent_to_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing local"):
        download("./no/such/dir", tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        download("no-such-model.gguf", tmp_path / "ck")


def test_list(capsys, monkeypatch):
    assert download_list()[0] == "smollm2-135m-instruct" and DEFAULT_REPO_ID in download_list()
    assert download_command("list") is None
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    from leantune.models.decoder.presets import preset_names

    assert set(preset_names()) <= set(download_list())
    assert "meta-llama/Llama-2-7b-hf" in download_list()


def test_download_command_docstring_documents_args():
    import inspect

    doc = inspect.getdoc(download_command)
    for name in inspect.signature(download_command).parameters:
        assert f"{name}:" in doc
    assert dl.ALIASES["smollm2-135m-instruct"] == DEFAULT_REPO_ID
