"""How OpenMP's threads wait and how many torch gets, so a machine shared with other work degrades gracefully.

torch's CPU ops run in OpenMP parallel regions that end in a barrier. By default libgomp's waiting threads spin for
a while before they sleep: on an idle machine that catches the next region at once, but when other processes hold
the cores the spinning burns the very time slices the late thread needs (2 cores at load 7-8: 0.6 tokens/s at the
default 2 threads against 11.6 with --threads 1). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) removes that cliff,
and then all usable CPUs beat fewer threads under load too (measured in bench/threads_cpu.py: the scheduler shares
CPU time per thread, so one thread gets a smaller share of a busy machine). So: passive waiting when the machine is
busy at start, libgomp's spinning when it is idle, and one thread per usable CPU (affinity mask, cgroup quota).
"Busy" is other tasks runnable now (sampled a few times over ~10 ms), not the 1-minute load average alone: the
average still shows the user's own previous run for a minute after it ended, and passive waiting costs an idle
machine a few percent.

libgomp reads its environment once, when torch loads it: `prepare()` runs before `import torch` (leantune.cli).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

RUNNABLE_SAMPLES = 5
"""How many times `current_load` reads the runnable tasks (2 ms apart); the median counts, so a task that runs for a
moment (a shell, a pipe's other end) does not make the machine busy."""

SAMPLE_GAP_S = 0.002

T = TypeVar("T")


@dataclass(frozen=True)
class Load:
    """The machine's load when the process started: 1-minute average and tasks runnable besides us (the median of
    a few samples)."""

    average: float
    runnable_others: int
    cpus: int = 1

    @property
    def busy(self) -> bool:
        """Another task wants a CPU now, or the last minute averaged more runnable tasks than one run on every usable
        CPU leaves behind (so the user's own previous command does not count)."""
        return self.runnable_others >= 1 or self.average > self.cpus + 0.5


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cpus: int
    forced: bool  # --threads given

    def describe(self) -> str:
        how = "--threads" if self.forced else f"of {self.cpus} usable CPUs; --threads N overrides"
        seen = "" if _load is None else f" (load {_load.average:.1f}, {_load.runnable_others} other runnable at start)"
        return f"{self.threads} ({how}), OpenMP waiting {wait_policy()}{seen}"


_load: Load | None = None
_torch_default: int | None = None


def current_load(stats: list[str] | None = None) -> Load | None:
    """The load average and the runnable tasks other than this one (/proc/stat's procs_running, the median of
    `RUNNABLE_SAMPLES` reads, or of `stats` given); None without /proc (the load average alone is not worth acting
    on)."""
    try:
        stats = _read_stats() if stats is None else stats
        average = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    running = sorted(_procs_running(stat) for stat in stats)[len(stats) // 2]
    return Load(average, max(0, running - 1), usable_cpus())


def _read_stats() -> list[str]:
    stats = []
    for i in range(RUNNABLE_SAMPLES):
        if i:
            time.sleep(SAMPLE_GAP_S)
        stats.append(Path("/proc/stat").read_text())
    return stats


def _procs_running(stat: str) -> int:
    return next((int(line.split()[1]) for line in stat.splitlines() if line.startswith("procs_running")), 1)


def prepare() -> None:
    """Before `import torch`: passive OpenMP waiting when the machine is busy, unless the user set OMP_WAIT_POLICY or
    GOMP_SPINCOUNT (those win)."""
    global _load
    _load = current_load()
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if _load is not None and _load.busy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def wait_policy() -> str:
    """OpenMP's waiting as this process's environment sets it (what libgomp read if it loaded after `prepare`)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"].lower()
    if "GOMP_SPINCOUNT" in os.environ:
        return f"spin {os.environ['GOMP_SPINCOUNT']} then sleep"
    return "spin then sleep (libgomp default)"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 cpu.max, or v1 cfs quota), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def apply_threads(threads: int | None) -> ThreadChoice:
    """Set torch's intra-op threads: `threads` when given (--threads), else one per usable CPU, at most torch's own
    default (its physical cores, which skips hyperthread siblings). Returns the choice; `describe()` says why."""
    global _torch_default
    import torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    cpus = usable_cpus()
    choice = ThreadChoice(threads, cpus, True) if threads else ThreadChoice(min(cpus, _torch_default), cpus, False)
    torch.set_num_threads(choice.threads)
    return choice


def in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) run in a thread of its own that ends with it: its result, or its exception raised here.

    For heavy torch work (loading a model or an adapter) in a thread that lives on while another thread does the
    decoding, as `leantune serve`'s main and request threads do beside its engine thread. libgomp keeps an OpenMP
    thread pool for every thread that has run a parallel region, for as long as that thread lives, and once it manages
    more threads than there are CPUs it cuts every waiting thread's spin to ~100 iterations: each small op of the
    decoding thread then waits for a sleeping worker to wake. On 2 cores a [16, 576] x [576, 16] matmul took ~80-100
    us instead of ~6, and the default model's 16-row serve step ~70 ms instead of ~59. A thread that ends takes its
    pool with it."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # raised again in the caller's thread
            result.append((False, e))

    thread = threading.Thread(target=run, name=f"leantune-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
