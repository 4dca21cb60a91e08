"""Shared fixtures: deterministic torch on 2 threads, and the default model converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model as an HF folder: `checkpoints/` under the repo root if complete, else converted once."""
    from leantune.checkpoint.gguf import default_gguf_path, gguf_to_hf
    from leantune.download import DEFAULT_REPO_ID, is_complete

    existing = REPO_ROOT / "checkpoints" / DEFAULT_REPO_ID
    if is_complete(existing):
        return existing
    return gguf_to_hf(default_gguf_path(), tmp_path_factory.mktemp("ckpt") / "SmolLM2-135M-Instruct")
