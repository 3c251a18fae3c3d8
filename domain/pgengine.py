"""The store on PostgreSQL (psycopg 3): one database shared by the appliances of a fleet.

Imported only for a `postgresql://` store URL, so the SQLite default needs no driver. What it adds to
the SQLite engine's contract (domain/sqlengine.py):

- Every write transaction first takes one transaction-scoped advisory lock: writers are serialised
  across appliances as SQLite's BEGIN IMMEDIATE serialises them in one file, which the checks made
  inside a write (a user's quota in `create_server`) rely on. Reads take no lock.
- Migrations run under the same lock, in one transaction with their version bump (table
  `cello_schema`): appliances starting together on one database migrate it once.
- A lost connection makes the call raise StoreError("store unreachable: …") and the next call connects
  again, so an appliance outlives its database being down (its nodes keep their exported roots).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import conninfo

from domain.errors import StoreError, StoreUnreachable
from domain.schema_pg import PG_MIGRATIONS, PG_SCHEMA_VERSION
from domain.sqlengine import Row, Tx

# The key of the store's advisory lock ("cello" in ASCII): one lock for writes and migrations alike.
STORE_LOCK = 0x63656C6C6F
_TAKE_LOCK = "SELECT pg_advisory_xact_lock(%s)"
CONNECT_TIMEOUT_S = 5  # unless the URL sets connect_timeout: a call must not hang on a host that is gone


class PgRow:
    """sqlite3.Row's interface over a psycopg row: by index, by column name, `dict(r)`, unpacking."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str, /) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _pg_rows(cursor: psycopg.Cursor[Any]) -> Any:
    index = {col.name: i for i, col in enumerate(cursor.description or ())}  # once per statement, not per row
    return lambda values: PgRow(index, values)


@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """The store's `?` placeholders as psycopg's `%s`; a literal `%` doubled (LIKE patterns travel as
    parameters, so the store's SQL has none of its own to keep)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(pg_sql(sql), tuple(args))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.cursor().executemany(pg_sql(sql), [tuple(r) for r in rows])


class PgEngine:
    integrity_errors: tuple[type[Exception], ...] = (psycopg.IntegrityError,)

    def __init__(self, url: str) -> None:
        try:
            params = conninfo.conninfo_to_dict(url)  # a malformed URL fails here, before any connecting
        except psycopg.Error as e:
            raise StoreError(f"store url: {e}") from None
        self._conninfo = url if "connect_timeout" in params else conninfo.make_conninfo(
            url, connect_timeout=CONNECT_TIMEOUT_S)
        # one connection used by one thread at a time (AsyncStore's worker): a read inside a write
        # transaction is part of it, as on SQLite
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._depth = 0  # nested guards: only the outermost maps a driver error

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._conninfo, autocommit=True, row_factory=_pg_rows)
        return self._conn

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A driver error leaves as StoreError; a broken connection is dropped, for the next call to
        connect again."""
        self._depth += 1
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            if self._depth > 1:
                raise
            conn = self._conn
            if conn is None or conn.broken or conn.closed:
                self._drop()
                raise StoreUnreachable(f"store unreachable: {' '.join(str(e).split())}") from e
            raise StoreError(f"store: {' '.join(str(e).split())}") from e
        finally:
            self._depth -= 1

    @property
    def version(self) -> int:
        with self._lock, self._guard():
            conn = self._connection()
            if conn.execute("SELECT to_regclass('cello_schema')").fetchone()[0] is None:  # type: ignore[index]
                return 0
            row = conn.execute("SELECT version FROM cello_schema").fetchone()
            return 0 if row is None else int(row[0])

    def migrate(self) -> None:
        with self._lock, self._guard():
            conn = self._connection()
            with conn.transaction():
                conn.execute(_TAKE_LOCK, (STORE_LOCK,))  # whoever comes second finds the work done
                conn.execute("CREATE TABLE IF NOT EXISTS cello_schema (version BIGINT NOT NULL)")
                row = conn.execute("SELECT version FROM cello_schema").fetchone()
                if row is None:
                    conn.execute("INSERT INTO cello_schema VALUES (0)")
                current = 0 if row is None else int(row[0])
                if current > PG_SCHEMA_VERSION:
                    raise StoreError(f"store schema {current} is newer than this Cello ({PG_SCHEMA_VERSION})")
                for target in range(current, PG_SCHEMA_VERSION):
                    conn.execute(PG_MIGRATIONS[target])  # no parameters: several statements at once
                    conn.execute("UPDATE cello_schema SET version = %s", (target + 1,))

    def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._lock, self._guard():
            return list(self._connection().execute(pg_sql(sql), tuple(args)).fetchall())

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock, self._guard():
            conn = self._connection()
            with conn.transaction():
                conn.execute(_TAKE_LOCK, (STORE_LOCK,))
                yield _PgTx(conn)
