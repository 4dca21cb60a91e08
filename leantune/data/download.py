"""Fetch a dataset file once into the local cache: resumable (HTTP Range into `<file>.part`), checksummed.

The sha256 is verified when known; otherwise it is recorded next to the file on first download (`<file>.sha256`)
and verified on every later use, so a changed or corrupted cache is caught instead of silently trained on.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from leantune.data.errors import DataError

CHUNK = 1 << 20
HUB_HOSTS = frozenset({"huggingface.co", "hf.co"})
"""Hosts that get HF_TOKEN. Only these serve `/resolve/` URLs; the CDN hosts they redirect to (cdn-lfs*.huggingface.co,
*.xethub.hf.co) get pre-signed URLs and need no token, so they are deliberately not listed."""


class DownloadError(DataError):
    """A file could not be fetched or failed its checksum; the message says how to use a local copy instead."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def offline_hint(option: str = "--data.local_path") -> str:
    return (f"Download the file on a machine with internet access and point at it with {option} FILE, or "
            "convert it to JSON/JSONL and use --data JSON --data.json_path FILE")


def ensure_file(url: str, dest: Path, sha256: str | None = None, hint: str | None = None, retries: int = 3,
                timeout: float = 60.0) -> Path:
    """`dest`, downloaded from `url` if missing, its checksum verified (or recorded on first download)."""
    dest = Path(dest)
    record = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        expected = sha256 or (record.read_text().split()[0] if record.is_file() else None)
        actual = sha256_of(dest)
        if expected and actual != expected:
            raise DownloadError(f"{dest}: sha256 {actual} does not match the expected {expected} (from "
                                f"{'the known checksum' if sha256 else record}). The cached file is corrupt or "
                                f"was changed: delete it to download it again.", path=dest)
        if not record.is_file():
            record.write_text(f"{actual}  {dest.name}\n")
        return dest
    download(url, dest, sha256=sha256, hint=hint, retries=retries, timeout=timeout)
    return dest


def download(url: str, dest: Path, sha256: str | None = None, hint: str | None = None, retries: int = 3,
             timeout: float = 60.0) -> Path:
    """Stream `url` into `dest.part` (resuming what is there), verify, then rename to `dest` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: BaseException | None = None
    for _ in range(max(1, retries)):
        try:
            _fetch(url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise DownloadError(f"could not download {url}: HTTP {e.code} ({e.reason}). The dataset may be "
                                    "gated: accept its terms on the Hugging Face Hub and set HF_TOKEN. "
                                    f"{hint or offline_hint()}", path=dest) from None
            if e.code < 500 and e.code != 416:
                raise DownloadError(f"could not download {url}: HTTP {e.code} ({e.reason}). "
                                    f"{hint or offline_hint()}", path=dest) from None
            last = e
            if e.code == 416:  # our Range is past the end: the .part is stale, start over
                part.unlink(missing_ok=True)
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            last = e
    else:
        reason = getattr(last, "reason", None) or last
        raise DownloadError(f"could not download {url} ({reason}); no network, or the host is unreachable. "
                            f"Partial data is kept in {part} and resumed next time. {hint or offline_hint()}",
                            path=dest) from None
    actual = sha256_of(part)
    if sha256 and actual != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: downloaded sha256 {actual} does not match the expected {sha256}; the "
                            f"download was discarded. Upstream may have changed the file. {hint or offline_hint()}",
                            path=dest)
    os.replace(part, dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{actual}  {dest.name}\n")
    return dest


def _fetch(url: str, part: Path, timeout: float) -> None:
    """One HTTP attempt: ask for the bytes after what `part` holds; append on 206, restart on 200."""
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "leantune"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    token = hub_token_for(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(TokenSafeRedirects)
    with opener.open(req, timeout=timeout) as resp:
        resume = have and resp.status == 206
        total = resp.headers.get("Content-Length")
        expected = int(total) if total is not None else None
        with open(part, "ab" if resume else "wb") as fh:
            got = _copy(resp, fh, url, (have if resume else 0), expected)
        if expected is not None and got < expected:
            raise ConnectionError(f"connection closed after {got} of {expected} bytes")


def hub_token_for(url: str) -> str | None:
    """HF_TOKEN for an https URL on a Hub host (exact match, default port), else None: the token is the user's
    account, so it never goes to a host that merely has "huggingface.co" somewhere in its URL."""
    token = os.environ.get("HF_TOKEN")
    return token if token and _is_hub_origin(url) else None


def _is_hub_origin(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return False
    return parts.scheme == "https" and parts.hostname in HUB_HOSTS and port in (None, 443)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    return parts.scheme, parts.hostname, port


class TokenSafeRedirects(urllib.request.HTTPRedirectHandler):
    """urllib copies every header into the redirected request; drop Authorization unless the redirect stays on the
    same scheme, host and port (the Hub redirects file downloads to CDN hosts that must never see the token)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _copy(resp, fh, url: str, start: int, length: int | None) -> int:
    """Copy the response body into fh with a progress bar on a terminal; returns bytes copied."""
    from tqdm import tqdm

    total = start + length if length is not None else None
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
              disable=not sys.stderr.isatty()) as bar:
        got = 0
        while True:
            try:
                block = resp.read(CHUNK)
            except Exception as e:  # http.client.IncompleteRead and friends: keep what we have, resume later
                raise ConnectionError(str(e)) from e
            if not block:
                break
            fh.write(block)
            got += len(block)
            bar.update(len(block))
    return got

