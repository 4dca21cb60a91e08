"""Two `leantune sweep` processes on one study in a real PostgreSQL server split a 6-point grid with no duplicate and
no lost trial. The server is Debian's postgresql package, started by the test in a temp folder (initdb + pg_ctl, as
the postgres user when the tests run as root, since PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.sweep_support import assert_grid_split, read_trials, start, sweep_cmd, write_spec

pytest.importorskip("optuna", reason="the [sweep] extra (optuna, sqlalchemy) is not installed")


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """postgresql://leantune@127.0.0.1:PORT/postgres of a fresh server, stopped afterwards."""
    binaries = pg_bin()
    if binaries is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed under CI: scripts/system_packages.sh installs Debian's postgresql")
        pytest.skip("PostgreSQL binaries (Debian's postgresql package) are absent: bash scripts/system_packages.sh")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the dev extra) is not installed")
    root = Path(tempfile.mkdtemp(prefix="leantune-pg-"))  # not under pytest's root-only folder: postgres reads it
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd[0]}: {proc.stdout}\n{proc.stderr}"

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "leantune", "--no-sync")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql://leantune@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_processes_split_a_grid_on_postgresql(tmp_path, tiny_checkpoint, json_data, postgres):
    spec = write_spec(tmp_path / "pg.yaml", tiny_checkpoint, json_data)
    procs = [start(sweep_cmd(spec, tmp_path / f"worker{i}", "--storage", postgres), tmp_path / f"p{i}.log")
             for i in range(2)]  # two sweep folders (as on two machines), one study
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
    trials = read_trials(postgres, "pg")
    assert_grid_split(trials, 6)
    assert len(trials) == 6
    ran = [(tmp_path / f"p{i}.log").read_text().count(": val_loss ") for i in range(2)]
    assert sum(ran) == 6 and min(ran) >= 1, f"both processes should have run trials: {ran}"
