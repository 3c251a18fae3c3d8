"""What differs between the store's database engines, and nothing else: connecting, transactions,
migrations, placeholders and the driver's integrity error. domain/store.py holds every query and is the
same on both; it writes SQL that SQLite and PostgreSQL both accept, with `?` placeholders.

`SqliteEngine` is the default (one file, one appliance); domain/pgengine.py is the PostgreSQL one (a
store shared by a fleet), imported only when a `postgresql://` URL asks for it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from domain.errors import StoreError
from domain.schema import MIGRATIONS, SCHEMA_VERSION


class Row(Protocol):
    """A result row on either engine: `r[0]`, `r["col"]`, `dict(r)` and unpacking all work."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def keys(self) -> list[str]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """The statements of one transaction (domain/store.py `Store._tx`)."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


class Engine(Protocol):
    # the driver's exception for a broken constraint, which the store turns into a Conflict
    integrity_errors: tuple[type[Exception], ...]

    @property
    def version(self) -> int: ...
    def migrate(self) -> None: ...
    def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Rows of one statement; inside `tx()` (same thread) it sees that transaction."""
        ...
    def tx(self) -> AbstractContextManager[Tx]:
        """A write transaction, serialised against every other writer of the store."""
        ...
    def close(self) -> None: ...


class SqliteEngine:
    """One connection in WAL mode, shared by the store's callers under a lock (AsyncStore uses one
    thread; the lock keeps a test's direct calls safe too)."""

    integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path | str) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # it holds CHAP secrets and BMC passwords: the appliance's alone (SQLite gives -wal/-shm the same mode)
        if str(path) != ":memory:":
            os.chmod(path, 0o600)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self._lock:
            current = self.version
            if current > SCHEMA_VERSION:
                raise StoreError(f"store schema {current} is newer than this Cello ({SCHEMA_VERSION})")
            for target in range(current, SCHEMA_VERSION):
                # executescript commits first; the migration and its version bump are one transaction.
                self._db.executescript(
                    f"BEGIN; {MIGRATIONS[target]}; PRAGMA user_version = {target + 1}; COMMIT;"
                )

    def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        # IMMEDIATE takes the write lock at BEGIN: a check inside (a quota) sees what the write will.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
