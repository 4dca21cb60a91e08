"""Which process runs which trial: one row per slot (grid point i, or the i-th random/TPE trial) in a table of the
study's own database, claimed by an INSERT that the primary key makes atomic on SQLite and PostgreSQL alike.

Optuna's own hand-out of grid points and queued trials reads then writes without a lock on SQLite, so two processes
can take the same point; a unique key cannot. A claim carries a heartbeat: a process killed mid-trial leaves a
slot whose heartbeat stops, which another process (or the same command run again) takes over after
`stale_after` seconds; an interrupted process (Ctrl-C, SIGTERM) releases its slot at once.
"""

from __future__ import annotations

import functools
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

TABLE = "leantune_sweep_slots"
RUNNING, RELEASED, DONE, FAILED, PRUNED = "running", "released", "done", "failed", "pruned"
FINISHED = (DONE, FAILED, PRUNED)


def require_sweep() -> tuple[Any, Any]:
    """(optuna, sqlalchemy), or one clear error naming the optional extra: the main job does not need them."""
    try:
        import optuna
        import sqlalchemy
    except ImportError as e:
        raise ImportError(f"leantune sweep needs {e.name}: pip install 'leantune[sweep]' (optuna, sqlalchemy)") from e
    return optuna, sqlalchemy


@functools.cache
def _schema() -> tuple[Any, Any]:
    """(metadata, table) of the slots, built on first use."""
    _, sa = require_sweep()
    metadata = sa.MetaData()
    table = sa.Table(
        TABLE, metadata,
        sa.Column("study", sa.String(512), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("worker", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("trial", sa.Integer, nullable=True),
    )
    return metadata, table


def worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Slots:
    """The slot rows of one study; `engine` is an SQLAlchemy engine on the study's storage URL."""

    engine: Any  # sqlalchemy.Engine
    study: str
    worker: str

    def create(self) -> None:
        """Create the table if missing; two processes creating it at once is fine (the loser finds it made)."""
        _, sa = require_sweep()
        metadata, _ = _schema()
        for attempt in range(5):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except sa.exc.DBAPIError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def claim(self, slot: int, stale_after: float) -> bool:
        """Take `slot` for this worker: a new row, or a released one, or one whose heartbeat is older than
        `stale_after` seconds. True when this worker now owns it."""
        _, sa = require_sweep()
        slots_table = _schema()[1]
        now = time.time()
        try:
            with self.engine.begin() as c:
                c.execute(slots_table.insert().values(study=self.study, slot=slot, worker=self.worker, state=RUNNING,
                                                      heartbeat=now))
            return True
        except sa.exc.IntegrityError:
            pass
        with self.engine.begin() as c:
            row = c.execute(sa.select(slots_table).where(self._key(slot))).one_or_none()
        if row is None or row.state in FINISHED:
            return False
        if row.state == RUNNING and row.heartbeat >= now - stale_after:
            return False
        # compare-and-set on the row as it was read: of two processes taking over the same slot one wins
        with self.engine.begin() as c:
            taken = c.execute(slots_table.update().where(
                self._key(slot), slots_table.c.worker == row.worker, slots_table.c.state == row.state,
                slots_table.c.heartbeat == row.heartbeat).values(worker=self.worker, state=RUNNING, heartbeat=now))
        return taken.rowcount == 1

    def previous_trial(self, slot: int) -> int | None:
        _, sa = require_sweep()
        slots_table = _schema()[1]
        with self.engine.begin() as c:
            return c.execute(sa.select(slots_table.c.trial).where(self._key(slot))).scalar_one_or_none()

    def set_trial(self, slot: int, trial: int) -> None:
        self._update(slot, trial=trial, heartbeat=time.time())

    def beat(self, slot: int) -> None:
        self._update(slot, heartbeat=time.time())

    def finish(self, slot: int, state: str) -> None:
        self._update(slot, state=state, heartbeat=time.time())

    def rows(self) -> list:
        _, sa = require_sweep()
        slots_table = _schema()[1]
        with self.engine.begin() as c:
            return list(c.execute(sa.select(slots_table).where(slots_table.c.study == self.study)
                                  .order_by(slots_table.c.slot)))

    def _key(self, slot: int):
        _, sa = require_sweep()
        slots_table = _schema()[1]
        return sa.and_(slots_table.c.study == self.study, slots_table.c.slot == slot)

    def _update(self, slot: int, **values) -> None:
        slots_table = _schema()[1]
        with self.engine.begin() as c:
            c.execute(slots_table.update().where(self._key(slot), slots_table.c.worker == self.worker).values(**values))
