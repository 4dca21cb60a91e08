"""Base for datasets fetched from a public URL into a local cache, with a local-file escape hatch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.data.base import InstructionDataModule
from leantune.data.download import ensure_file, offline_hint
from leantune.data.errors import DataError


@dataclass
class DownloadedDataModule(InstructionDataModule):
    """An instruction dataset downloaded once (resumable, sha256-checked) into `cache_dir/<name>/`."""

    local_path: Path | None = None
    """Use this local copy (the upstream file, or folder of files) instead of downloading."""
    cache_dir: Path = Path("data_cache")
    """Folder for downloaded datasets (one sub-folder per dataset)."""

    def fetch(self, url: str, name: str, filename: str, sha256: str | None = None, folder: bool = False) -> Path:
        """The local path of one upstream file: from `local_path` if given, else the cache (downloading once).

        `folder=True` for datasets of several files: `local_path` must then be the folder holding them.
        """
        if self.local_path is not None:
            path = Path(self.local_path)
            if folder and not path.is_dir():
                raise DataError(f"{path}: not a folder (from --data.local_path). This dataset has several files; "
                                f"give the folder that holds {filename} and the others.", path=path)
            path = path / filename if path.is_dir() else path
            if not path.is_file():
                raise DataError(f"{path}: no such file (from --data.local_path). Give the downloaded {filename} "
                                "or the folder holding it.", path=path)
            return path
        return ensure_file(url, Path(self.cache_dir) / name / filename, sha256=sha256, hint=offline_hint())
