"""A throwaway PostgreSQL for tests: its own cluster in a temp folder, reachable only on a unix socket
there (no TCP port: nothing clashes with the host's own PostgreSQL or another test run), fsync off, removed
at the end. Debian's `postgresql` package provides the binaries (scripts/setup.sh installs it); as root
they run as the `postgres` user, which initdb insists on.

API (all of it):

    server = PgServer.start()           # initdb + pg_ctl start; fails the test naming the fix if not installed
    url = server.create_database("t1")  # an empty database; returns server.url("t1")
    server.url("t1")                    # "postgresql:///t1?host=/tmp/cello-pg-…&user=cello", for psycopg
                                        #  and for Cello's `[store] url`
    server.drop_database("t1")          # even with connections still open to it
    server.halt(); server.resume()      # the database down (data kept) and up again: an outage
    server.stop()                       # the cluster and its folder gone; idempotent

or, in pytest, the session fixture `pg_server` (import it into a conftest.py or the test module), and
`fresh_database(pg_server)` for a database named after a counter.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "cello"  # the cluster's own superuser; the URL names it, so any OS user can connect
_names = itertools.count(1)


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        pytest.fail("PostgreSQL not installed: run scripts/setup.sh (apt-get install postgresql)", pytrace=False)
    return Path(found[-1]).parent


class PgServer:
    def __init__(self, bindir: Path, root: Path) -> None:
        self._bindir = bindir
        self.root = root
        self.socket_dir = root  # the socket lives beside the data folder
        self._data = root / "data"
        self._running = False

    @classmethod
    def start(cls) -> PgServer:
        bindir = _bindir()
        root = Path(tempfile.mkdtemp(prefix="cello-pg-"))
        server = cls(bindir, root)
        try:
            if os.geteuid() == 0:
                shutil.chown(root, "postgres", "postgres")
            server._run("initdb", "-D", str(server._data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                        "-E", "UTF8", "--locale=C")
            with open(server._data / "postgresql.conf", "a") as conf:
                # a test cluster: durability traded for speed, no TCP, the socket in our own folder
                conf.write(f"listen_addresses = ''\nunix_socket_directories = '{root}'\n"
                           "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
            server.resume()
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self._bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, check=False)
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    def url(self, dbname: str) -> str:
        return f"postgresql:///{dbname}?host={self.socket_dir}&user={SUPERUSER}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, dbname: str) -> str:
        self._admin(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def halt(self) -> None:
        """The database down, its data kept (what an outage looks like to the appliances)."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")
        self._running = False

    def resume(self) -> None:
        """Up again after `halt()` (and the first start)."""
        self._run("pg_ctl", "-D", str(self._data), "-l", str(self.root / "log"), "-w", "-t", "60", "start")
        self._running = True

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer.start()
    yield server
    server.stop()


def fresh_database(server: PgServer) -> tuple[str, str]:
    """(name, url) of a new empty database."""
    name = f"t{os.getpid()}_{next(_names)}"
    return name, server.create_database(name)
