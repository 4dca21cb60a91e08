"""One output folder holds one run: checked, locked and cleaned before any data or model is loaded.

`prepare_run_dir` is the first thing a training command does, so a bad `--out_dir` fails in a second, not after
the model loaded and the before-training evaluation ran. Rules:
- the folder must be creatable and writable (a file in the way or a read-only parent: one error naming the path);
- a new run needs a folder that is new, empty, or (with --overwrite) holds only leantune run output, which is then
  removed: only RUN_OUTPUTS names, never anything else;
- --resume continues the run in the folder (files leantune did not write are left alone there);
- a folder with files leantune did not write is never written into by a new run.

Stale temporaries: checkpoint writes go to hidden siblings `.step-N.tmp-<hex>` (and `.final.old-<hex>` while an
existing folder is swapped out; see leantune.checkpoint.io.atomic_dir). Their names carry no pid, so the writer is
proved gone another way: the run holds an exclusive lock on `<out_dir>/.leantune.lock` (fcntl.flock, released by
the kernel when the process dies, SIGKILL included) for as long as it lives. Whoever gets the lock is the only
writer, so every temporary in the folder belongs to a dead run: `.tmp-` ones are deleted (incomplete, or complete
but never renamed into place), and an `.old-` one is renamed back when its folder is missing (a kill between
atomic_dir's two renames) or deleted otherwise. A second live run into the same folder is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from leantune.checkpoint.io import RUN_LOCK, lock_file
from leantune.train.state import checkpoint_step, find_latest_checkpoint

LOCK_FILE = RUN_LOCK
RUN_OUTPUTS = ("final", "metrics.csv", "loss.png", "summary.json", "tensorboard", "run.json",
               "reference_logps.safetensors")
"""Top-level names a run writes (besides step-N folders and hidden temporaries); --overwrite removes only these."""
_STEP = re.compile(r"step-\d+")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}")
_OWN_FILE_TEMPS = ("metrics.tmp", "loss.tmp.png")  # written beside metrics.csv / loss.png, then renamed
_locks: dict[Path, int] = {}  # held for the life of the process: the kernel drops them when it dies


class RunDirError(ValueError):
    """The output folder cannot be used as asked (the message names the path and the way out)."""


def is_run_output(name: str) -> bool:
    m = _TEMP.fullmatch(name)
    base = m["name"] if m else name
    return (base in RUN_OUTPUTS or bool(_STEP.fullmatch(base)) or name in _OWN_FILE_TEMPS
            or name == LOCK_FILE)


def prepare_run_dir(out_dir: str | Path, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Check, lock and clean `out_dir` for a run (rules in the module docstring); returns it as a Path."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite replaces it: pass only one")
    _ensure_writable(out_dir)
    _lock(out_dir)
    clean_stale_temporaries(out_dir)
    entries = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_FILE)
    foreign = [n for n in entries if not is_run_output(n)]
    own = [n for n in entries if is_run_output(n)]
    if resume:
        return out_dir
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirError(f"{out_dir} holds files leantune did not write ({shown}); a run needs a new or empty "
                          "folder: choose another --out_dir")
    if own and not overwrite:
        raise RunDirError(f"{out_dir} holds {describe_run(out_dir)}: pass --resume auto to continue it, "
                          "--overwrite true to replace it, or another --out_dir")
    for name in own:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return out_dir


def describe_run(out_dir: Path) -> str:
    """'a finished run (final/, 50 steps)' or 'an unfinished run (last checkpoint step-000020/)' or 'a run's output'."""
    latest = find_latest_checkpoint(out_dir)
    if (out_dir / "final").is_dir():
        steps = checkpoint_step(out_dir / "final")
        return "a finished run (final/" + (f", {steps} steps)" if steps is not None else ")")
    if latest is not None:
        return f"an unfinished run (last checkpoint {latest.name}/)"
    return "another run's output"


def _ensure_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    for parent in out_dir.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--out_dir {out_dir}: {parent} is a file, not a folder")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".leantune-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"--out_dir {out_dir} is not writable ({e.strerror or e}): fix its permissions or choose "
                          "another --out_dir") from e


def _lock(out_dir: Path) -> None:
    """Exclusive lock for this process's lifetime; another live process holding it means a concurrent run."""
    key = out_dir.resolve()
    if key in _locks:
        return
    fd = lock_file(out_dir / LOCK_FILE)
    if fd is None:
        raise RunDirError(f"{out_dir} is in use by another running leantune process: wait for it, stop it, or "
                          "choose another --out_dir")
    _locks[key] = fd


def clean_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove the temporaries of dead runs (see the module docstring); returns what was removed or restored."""
    done = []
    for path in sorted(Path(out_dir).iterdir()):
        m = _TEMP.fullmatch(path.name)
        if path.name in _OWN_FILE_TEMPS:
            path.unlink(missing_ok=True)
        elif m and is_run_output(m["name"]):
            target = path.with_name(m["name"])
            if m["kind"] == "old" and not target.exists():
                os.replace(path, target)  # killed between atomic_dir's two renames: the old folder is complete
                done.append(f"{path.name} -> {target.name}")
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        else:
            continue
        done.append(path.name)
    if done:
        print(f"removed {len(done)} leftover temporary file(s) of an interrupted run in {out_dir}")
    return done
