"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints `HfApi.create_repo` and `HfApi.create_commit`
(what `upload_folder` sends), and the card check `/api/validate-yaml` call, keeping every request and the committed files in memory. Small files go up inline
(the preupload answer says "regular"), so no LFS or Xet transfer is involved."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[dict] = []  # method, path, headers, body (bytes)
        self.validated: list[str] = []  # README texts sent to /api/validate-yaml
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [message]}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"method": "POST", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if self.path == "/api/validate-yaml":  # the client checks a README's front matter before committing
                    hub.validated.append(json.loads(body).get("content", ""))
                    return self._reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos.setdefault(repo, {"private": bool(req.get("private")) or req.get("visibility") == "private", "files": {}, "commits": []})
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+).*", self.path)
                if not m or m[1] not in hub.repos:
                    return self._reply(404, {"error": f"no route {self.path}"})
                repo, what = m[1], m[2]
                if what == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.repos[repo]["commits"].append(item["value"]["summary"])
                    elif item["key"] == "file":
                        hub.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    else:
                        return self._reply(400, {"error": f"unexpected commit item {item['key']}"})
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}",
                                         "commitOid": "0" * 40, "pullRequestUrl": None})

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": b""})
                self._reply(404, {"error": f"no route {self.path}"})

        self.token = "hf_test_" + "x" * 20
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
