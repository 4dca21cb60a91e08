"""Reading the pickles a run, adapter or model folder may hold without ever running what they hold.

A folder is untrusted by default (a team volume, a downloaded run, a model from the Hub), and a pickle can name any
importable callable to be called while it loads. Two kinds of pickle reach leantune:

* torch.save files (`training_state.pt`, `pytorch_model.bin`, PEFT's `adapter_model.bin`, and each item inside a
  DCP `*.distcp` shard): read by `torch.load(weights_only=True)`, torch's own restricted unpickler (tensors, numbers,
  strings and plain containers). A refusal becomes `UntrustedFileError` naming the file and the way out.
* DCP's `.metadata`, a plain pickle of torch's checkpoint metadata dataclasses, which torch's FileSystemReader reads
  with plain `pickle.load`: read here by `MetadataUnpickler`, whose `find_class` allows only those dataclasses and
  the dtypes, layouts and sizes they hold. Torch's reader also unpickles a shard's non-tensor items (the optimizer's
  hyperparameters) with `weights_only=False`; `dcp_load` plugs in a reader and planner that use `weights_only=True`.

Why a restricted unpickler and not a digest of `.metadata` written into leantune's manifest at save: the manifest
lies in the same folder, so whoever can replace `.metadata` can replace its digest too. A digest catches a damaged
file, never a hostile one; refusing every class but the known few holds whoever wrote the folder.

`UntrustedFileError` is a ValueError: the CLI prints it as one `error:` line and serve's adapter route answers 400.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

FIX = "leantune never runs code from a file: load it only if you trust it, and convert it to safetensors"


class UntrustedFileError(ValueError):
    """A file holds a pickle that would run code or build objects beyond plain tensors and containers."""


def _refusal(e: BaseException) -> str:
    """The one useful phrase of torch's many-line weights_only refusal (e.g. 'it names io.open')."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it names {m.group(1)}"
    m = re.search(r"Unsupported (operand \d+|class \S+)", text)
    if m:
        return m.group(0)
    return text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__


def load_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU with one-line errors: a pickle beyond plain tensors is an
    UntrustedFileError, a damaged or foreign file a ValueError; both name the file. Missing files stay OSErrors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UntrustedFileError(f"{path}: holds a pickle that is not plain tensors ({_refusal(e)}); {FIX}") \
                from None
        raise ValueError(f"{path}: not a torch file ({_refusal(e)}); the file is damaged or of another kind") from e
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: cannot read it as a torch file ({str(e).strip()[:200] or type(e).__name__}); the "
                         "file is damaged or incomplete: write or download it again") from e


def load_tensor_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A `*.bin` state dict: `load_torch_file`, then a check that it maps names to tensors."""
    sd = load_torch_file(path, mmap=mmap)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of named tensors; convert the "
                         "weights to safetensors")
    return sd


# ---- DCP metadata ----------------------------------------------------------------------------------------------
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                         "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: a lookup among torch's layouts
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),  # StorageMeta.checkpoint_id: where it was saved
    ("collections", "OrderedDict"),
    *(("builtins", name) for name in ("set", "frozenset", "tuple", "list", "dict")),
})
"""(module, name) pairs a DCP `.metadata` may name: the classes torch's own checkpoint metadata is made of (each
merely stores its fields when called) plus plain containers. Nothing here opens a file, imports or runs code."""
_PATH_STAND_INS = {("pathlib", "PosixPath"): PurePosixPath, ("pathlib", "WindowsPath"): PureWindowsPath}
"""The concrete paths torch records load as pure paths: no file system access, and a WindowsPath saved on Windows
loads on Linux too."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: `find_class` hands out ALLOWED_GLOBALS and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PATH_STAND_INS:
            return _PATH_STAND_INS[module, name]
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]  # a dtype pickles as the global torch.<name> (vars: no lazy submodule import)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP checkpoint metadata never holds")


def load_dcp_metadata(path: str | Path) -> Any:
    """The `torch.distributed.checkpoint` Metadata in file `path`, read by MetadataUnpickler and checked: every
    shard it points at is a plain file name inside the checkpoint folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            md = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("it names"):
            raise UntrustedFileError(f"{path}: holds a pickle beyond DCP checkpoint metadata ({e}); leantune never "
                                     "runs code from a checkpoint: use a checkpoint you or a trusted run wrote") from None
        raise ValueError(f"{path}: not DCP checkpoint metadata ({e}); the file is damaged or of another kind") from e
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read the DCP checkpoint metadata ({str(e).strip()[:200] or type(e).__name__}); "
                         "the file is damaged or incomplete") from e
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise ValueError(f"{path}: holds a {type(md).__name__}, not DCP checkpoint metadata")
    for info in md.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not _plain_file_name(name):
            raise UntrustedFileError(f"{path}: points at shard {name!r}, outside its folder; use a checkpoint you or "
                                     "a trusted run wrote")
    return md


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\x00" not in name


# ---- DCP load -----------------------------------------------------------------------------------------------------
def dcp_load(state_dict: dict[str, Any], folder: str | Path) -> None:
    """`torch.distributed.checkpoint.load(state_dict)` from `folder`, with metadata read by `load_dcp_metadata` and
    every shard item by `torch.load(weights_only=True)`; an error of any rank surfaces as itself, not wrapped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader_class, planner_class = _dcp_classes()
    try:
        dcp.load(state_dict, storage_reader=reader_class(folder), planner=planner_class())
    except CheckpointException as e:  # a BaseException holding each rank's error: the CLI would print a trace
        failures = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f]
        first = next((x for x in failures if isinstance(x, ValueError | OSError)), None)
        if first is not None:
            raise first from None
        other = next((x for x in failures if isinstance(x, RuntimeError | KeyError | AssertionError)), None)
        if other is None:
            raise
        raise ValueError(f"{folder}: cannot load this sharded checkpoint ({str(other).strip()[:200]}); it does not "
                         "match this run's model and optimizer, or it is damaged") from other


@functools.cache
def _dcp_classes() -> tuple[type, type]:
    """The safe reader and planner, made on first use (importing torch.distributed.checkpoint costs a second)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose metadata comes from `load_dcp_metadata` and whose errors name the shard file."""

        _current: str | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = load_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            md.storage_meta = md.storage_meta or _storage_meta()
            md.storage_meta.load_id = self.load_id
            return md

        def _slice_file(self, file: Any, sinfo: Any) -> Any:
            self._current = sinfo.relative_path  # read_data's next item comes from this shard
            return super()._slice_file(file, sinfo)

        def read_data(self, plan: Any, planner: Any) -> Any:
            try:
                return super().read_data(plan, planner)
            except UntrustedFileError:
                raise
            except pickle.UnpicklingError as e:
                file = Path(self.path) / (self._current or "")
                if "Weights only load failed" in str(e):
                    raise UntrustedFileError(f"{file}: holds a pickle that is not plain tensors ({_refusal(e)}); "
                                             "leantune never runs code from a checkpoint: use one you or a trusted "
                                             "run wrote") from None
                raise ValueError(f"{file}: cannot read a shard item ({_refusal(e)}); the file is damaged") from e
            except (RuntimeError, EOFError, KeyError) as e:
                file = Path(self.path) / (self._current or "")
                raise ValueError(f"{file}: cannot read a shard item ({str(e).strip()[:200] or type(e).__name__}); "
                                 "the file is damaged or incomplete") from e

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner whose non-tensor items load with weights_only=True (torch's uses weights_only=False)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, map_location="cpu", weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeFileSystemReader, SafeLoadPlanner


def _storage_meta() -> Any:
    from torch.distributed.checkpoint.metadata import StorageMeta

    return StorageMeta()


