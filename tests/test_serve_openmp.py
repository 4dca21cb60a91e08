"""`leantune serve` keeps one OpenMP thread pool, the engine thread's: the heavy torch work of other long-lived
threads (loading the model in the main thread, an adapter in a request thread) runs in a thread that ends
(`cpu_threads.in_own_thread`). A pool left behind makes libgomp manage more threads than CPUs, and it then cuts every
waiting thread's spin short, so each small op of the engine waits for a sleeping worker (README: serve, OpenMP)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest
import torch

from leantune.cpu_threads import in_own_thread
from leantune.inference import load_for_inference
from leantune.serve import engine as engine_module
from leantune.serve.engine import Engine


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settled_threads(expected: int, wait_s: float = 3.0) -> int:
    """The process's thread count once it reaches `expected` (ending pool threads take a moment to exit)."""
    deadline = time.monotonic() + wait_s
    while os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return os_threads()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # parallel regions get a worker thread, whatever this machine's CPU count
    yield
    torch.set_num_threads(before)


def big_parallel_op() -> float:
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    return float((a @ a).sum())


def test_work_in_its_own_thread_leaves_no_pool_behind(two_threads):
    """In a long-lived thread a parallel op leaves its OpenMP pool (the control); through in_own_thread it does not,
    and the result and exceptions come back."""
    expected = big_parallel_op()  # here, before counting: this thread's pool, if any, exists already
    with cf.ThreadPoolExecutor(1) as long_lived:
        long_lived.submit(lambda: None).result()
        base = os_threads()
        assert long_lived.submit(in_own_thread, big_parallel_op).result() == expected
        assert settled_threads(base) == base
        long_lived.submit(big_parallel_op).result()
        assert os_threads() > base  # the control: the pool lives on with its thread
    with pytest.raises(ZeroDivisionError):
        in_own_thread(lambda: 1 / 0)


@pytest.mark.slow
@pytest.mark.parametrize("own_thread", [True, False])
def test_engine_setup_and_adapter_loads_leave_no_pool_in_the_calling_thread(own_thread, two_threads,
                                                                           default_checkpoint, tmp_path,
                                                                           monkeypatch):
    """Built and given a grouped adapter from a long-lived thread (serve's main thread, a request thread), the engine
    adds one thread, its own; with the work in the caller's thread instead (own_thread=False, the old code) the
    caller's pool stays."""
    from serve_support import make_adapter

    if not own_thread:
        monkeypatch.setattr(engine_module, "in_own_thread", lambda fn, *a, **k: fn(*a, **k))
    adapter = make_adapter(default_checkpoint, tmp_path / "ia3", "ia3", seed=0)
    model, tokenizer, _, _ = in_own_thread(load_for_inference, default_checkpoint, "32-true")
    with cf.ThreadPoolExecutor(1) as long_lived:
        long_lived.submit(lambda: None).result()
        base = os_threads()
        engine = long_lived.submit(Engine, model, tokenizer, default_checkpoint, "smol", max_batch=2).result()
        try:
            long_lived.submit(engine.add_adapter, "ia3", adapter).result()
            after = settled_threads(base + 1)  # + the engine thread, idle: it has not run a parallel region yet
        finally:
            engine.close(timeout=10)
    assert (after == base + 1) == own_thread, (base, after)
