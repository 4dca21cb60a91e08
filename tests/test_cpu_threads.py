"""OpenMP waiting and the default thread count (leantune.cpu_threads): passive waiting chosen before torch loads when
the machine is busy, the user's own OpenMP settings and --threads kept."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune import cpu_threads

STAT = "cpu  1 2 3 4 0 0 0 0 0 0\ncpu0 1 2 3 4 0 0 0 0 0 0\nintr 5\nctxt 6\nprocs_running {running}\nprocs_blocked 0\n"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_threads, "_load", None)


@pytest.mark.parametrize(("average", "running", "busy"), [
    (0.1, [1, 1, 1, 1, 1], False),
    (1.9, [1, 1, 1, 1, 1], False),  # the user's own 2-thread run just ended: the average remembers it, nothing runs
    (2.6, [1, 1, 1, 1, 1], True),  # more than one run on both CPUs leaves behind
    (7.5, [1, 1, 1, 1, 1], True),
    (0.0, [2, 2, 2, 1, 3], True),  # another task runnable in most samples
    (0.0, [1, 3, 1, 1, 2], False),  # a task that ran for a moment (a shell, a pipe's other end)
    (0.0, [0, 0, 0, 0, 0], False),
])
def test_busy_from_other_runnable_tasks_or_an_average_beyond_our_own_run(monkeypatch, average, running, busy):
    monkeypatch.setattr(os, "getloadavg", lambda: (average, 0.0, 0.0))
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    load = cpu_threads.current_load([STAT.format(running=n) for n in running])
    assert load.runnable_others == max(0, sorted(running)[2] - 1) and load.average == average and load.cpus == 2
    assert load.busy is busy


def test_current_load_samples_proc_stat_several_times(monkeypatch):
    reads = []
    monkeypatch.setattr(cpu_threads, "_read_stats", lambda: reads.append(1) or [STAT.format(running=1)] * 5)
    assert cpu_threads.current_load() is not None and len(reads) == 1
    if Path("/proc/stat").exists():
        monkeypatch.undo()
        assert len(cpu_threads._read_stats()) == cpu_threads.RUNNABLE_SAMPLES


@pytest.mark.parametrize(("others", "policy"), [(1, "passive"), (0, "spin then sleep (libgomp default)")])
def test_prepare_waits_passively_on_a_busy_machine(clean_env, monkeypatch, others, policy):
    monkeypatch.setattr(cpu_threads, "current_load", lambda: cpu_threads.Load(1.0, others, 2))
    cpu_threads.prepare()
    assert cpu_threads.wait_policy() == policy
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if others else None)


@pytest.mark.parametrize(("name", "value", "policy"), [("OMP_WAIT_POLICY", "ACTIVE", "active"),
                                                       ("GOMP_SPINCOUNT", "1000", "spin 1000 then sleep")])
def test_the_users_openmp_settings_win(clean_env, monkeypatch, name, value, policy):
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(cpu_threads, "current_load", lambda: cpu_threads.Load(9.0, 3))
    cpu_threads.prepare()
    assert cpu_threads.wait_policy() == policy and os.environ[name] == value
    other = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} - {name}
    assert not other & set(os.environ)


def test_usable_cpus_follow_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: None)
    assert cpu_threads.usable_cpus() == 4
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: 1.5)  # 150 ms per 100 ms period: 2 threads
    assert cpu_threads.usable_cpus() == 2


def test_apply_threads_sets_torch_and_forced_threads_win(monkeypatch):
    before = torch.get_num_threads()
    try:
        choice = cpu_threads.apply_threads(1)
        assert torch.get_num_threads() == 1 and choice.forced and "(--threads)" in choice.describe()
        monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 3)
        monkeypatch.setattr(cpu_threads, "_torch_default", 64)
        auto = cpu_threads.apply_threads(None)
        assert auto.threads == 3 == torch.get_num_threads() and "of 3 usable CPUs" in auto.describe()
        monkeypatch.setattr(cpu_threads, "_torch_default", 2)  # never more than torch's physical cores
        assert cpu_threads.apply_threads(None).threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_cli_sets_openmp_waiting_before_torch_loads():
    """libgomp reads its environment once, when torch loads it: the CLI module must set it before importing torch."""
    code = ("import sys, os; import leantune.cpu_threads as c; assert 'torch' not in sys.modules, 'cpu_threads "
            "imports torch'; c.current_load = lambda: c.Load(5.0, 2); import leantune.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
    src = (Path(cpu_threads.__file__).parent / "cli.py").read_text()
    assert src.index("cpu_threads.prepare()") < src.index("import torch")
