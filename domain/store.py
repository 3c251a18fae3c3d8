"""The state store, the single source of desired state: SQLite in WAL mode by default, or PostgreSQL for
a fleet of appliances sharing one store (`open_store`).

This module owns all queries (parameterised only), written once in SQL that both engines accept; what
differs per engine (connecting, transactions, migrations, placeholders) is domain/sqlengine.py and
domain/pgengine.py, the schemas domain/schema.py and domain/schema_pg.py.
Methods are synchronous and short; async callers run them through `AsyncStore` on one worker thread.
(One idea: the rows and their transactions. Each table's methods are a section.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from domain.errors import Conflict, QuotaExceeded, StoreError, StoreUnreachable
from domain.sqlengine import Engine, Row, SqliteEngine, Tx
from domain.states import may_move

T = TypeVar("T")

# Volume indexes beside the exported ones (0 = OS, 1.. = data): a server's restore point, a rebuild's new
# root while it is being made, the restore point mid-swap, and an old restore point on its way out.
PREV_IDX, NEW_ROOT_IDX, SWAP_IDX, GONE_IDX = -1, -2, -3, -4
_VOLUME_COLUMNS = "name, server, kind, idx, size, state, serial, origin"


@dataclass(frozen=True)
class TemplateVersion:
    template: str
    version: str
    source: str
    size: int
    kernel: str
    initrd: str
    created_at: float


@dataclass(frozen=True)
class User:
    name: str
    max_volumes: int
    max_data_gb: int


@dataclass(frozen=True)
class VolumeRow:
    name: str
    server: str
    kind: str
    idx: int
    size: int
    state: str
    serial: str
    origin: str = ""  # "<template>@<version>" an OS volume or restore point was cloned from


@dataclass(frozen=True)
class ServerRow:
    uuid: str
    template: str
    version: str
    profile: str
    owner: str
    state: str
    reason: str
    macs: tuple[str, ...]
    hostname: str
    address: str
    created_at: float
    updated_at: float
    # CHAP for the server's target ('' = none); mutual: the target's own name and secret to the node
    chap_user: str = ""
    chap_secret: str = field(default="", repr=False)
    chap_mutual_user: str = ""
    chap_mutual_secret: str = field(default="", repr=False)
    labels: str = "{}"  # JSON object of label -> value (`rack=3`, `role=compute`)
    bmc_url: str = ""  # redfish://host[:port]/SystemId or ipmi://host[:port]; "" = none
    bmc_user: str = ""
    bmc_password: str = field(default="", repr=False)
    appliance: str = ""  # the appliance that holds the server's volumes ('' = made before fleets, unclaimed)
    moving_to: str = ""  # the target appliance of a move in progress ('' = none)

    @property
    def label_map(self) -> dict[str, str]:
        return _label_map(self.labels)


def _label_map(labels: str) -> dict[str, str]:
    raw = json.loads(labels or "{}")
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class ApplianceRow:
    """One appliance of a fleet sharing the store, as it registered itself and last reported."""

    name: str
    api_url: str  # where the other appliances reach its API
    advertise: str  # the address its nodes boot from
    labels: str = "{}"  # JSON object of label -> value
    capacity_bytes: int = 0
    free_bytes: int = 0
    disabled: bool = False  # an operator's: no new placement on it
    disabled_reason: str = ""
    answers_unknown: bool = False  # it answers PXE clients no server names (discovered nodes)
    version: str = ""  # the Cello version it runs
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    tls_fingerprint: str = ""  # SHA-256 of its HTTPS certificate, which the others pin ('' = no HTTPS)

    @property
    def label_map(self) -> dict[str, str]:
        return _label_map(self.labels)


@dataclass(frozen=True)
class TemplateCopyRow:
    """An appliance's copy of a template version: being copied, ready to clone from, or failed (detail)."""

    template: str
    version: str
    appliance: str
    state: str  # copying | ready | failed
    detail: str = ""
    checksum: str = ""
    updated_at: float = 0.0


@dataclass(frozen=True)
class DiscoveredRow:
    """A PXE client no server record names, as the proxyDHCP saw it (domain/discovered.py)."""

    mac: str
    uuid: str  # '' = it sent none, or a broken one
    arch: int  # option 93; -1 = not sent
    vendor_class: str
    user_class: str
    address: str  # '' = not known
    first_seen: float
    last_seen: float
    count: int  # boot requests seen (in a batch: seen since the last save)


def _where(**filters: object) -> tuple[str, tuple[object, ...]]:
    """`WHERE a = ? AND b = ?` over the filters that are not None (column names are ours, never input)."""
    terms = {col: value for col, value in filters.items() if value is not None}
    return ("WHERE " + " AND ".join(f"{col} = ?" for col in terms) if terms else ""), tuple(terms.values())


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


POSTGRES_SCHEMES = ("postgresql", "postgres")  # what libpq and psycopg take as a URL's scheme


def open_store(url: str, sqlite_path: Path, clock: Callable[[], float] = time.time, *,
               may_wait: bool = False) -> Store:
    """The store `[store] url` names: '' = the SQLite file at `sqlite_path`, `postgresql://…` = PostgreSQL
    (the driver is imported only then). A PostgreSQL that cannot be reached now is a StoreUnreachable,
    unless `may_wait`: then the store is made all the same, and migrated at its first call that reaches
    the database (`cello serve` starts on its cached boot index meanwhile; see `Store.unreachable`)."""
    if url == "":
        return Store(sqlite_path, clock)
    if url.split("://", 1)[0] in POSTGRES_SCHEMES:
        from domain.pgengine import PgEngine

        return Store(PgEngine(url), clock, may_wait=may_wait)
    raise StoreError(f"store url: must be '' (SQLite) or postgresql://…, not {url.split('://', 1)[0]!r}")


class Store:
    def __init__(self, path: Path | str | Engine, clock: Callable[[], float] = time.time, *,
                 may_wait: bool = False) -> None:
        """`path`: an SQLite file (or ':memory:'), or an engine (domain/pgengine.py); migrated on open,
        or (`may_wait`, a database out of reach now) before the first call that reaches it."""
        self._clock = clock
        self._engine: Engine = SqliteEngine(path) if isinstance(path, Path | str) else path
        self.unreachable = ""  # why the database could not be reached at open ('' = it could)
        self._migrating = threading.Lock()
        try:
            self._engine.migrate()
        except StoreUnreachable as e:
            if not may_wait:
                self._engine.close()
                raise
            self.unreachable = str(e)
        except BaseException:
            self._engine.close()
            raise

    def close(self) -> None:
        self._engine.close()

    @property
    def version(self) -> int:
        self._ready()
        return self._engine.version

    def migrate(self) -> None:
        self._engine.migrate()

    def _ready(self) -> None:
        """Migrated first, for a store opened while its database was out of reach (StoreUnreachable
        while it still is)."""
        if self.unreachable:
            with self._migrating:
                if self.unreachable:
                    try:
                        self._engine.migrate()
                    except StoreUnreachable as e:
                        self.unreachable = str(e)
                        raise
                    self.unreachable = ""

    def ping(self) -> None:
        """Returns once the database answers (StoreUnreachable while it does not)."""
        self._ready()
        self._engine.fetch("SELECT 1")

    def _tx(self) -> AbstractContextManager[Tx]:
        self._ready()
        return self._engine.tx()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        self._ready()
        return self._engine.fetch(sql, args)

    # --- templates -------------------------------------------------------------------------------

    def add_template_version(self, tv: TemplateVersion) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO templates (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (tv.template, tv.created_at))
            try:
                db.execute(
                    "INSERT INTO template_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tv.template, tv.version, tv.source, tv.size, tv.kernel, tv.initrd, tv.created_at),
                )
            except self._engine.integrity_errors:
                raise Conflict(f"template {tv.template} already has version {tv.version}") from None

    def template_versions(self, template: str | None = None) -> list[TemplateVersion]:
        sql = "SELECT * FROM template_versions"
        args: tuple[str, ...] = ()
        if template is not None:
            sql += " WHERE template = ?"
            args = (template,)
        rows = self._all(sql + " ORDER BY template, CAST(substr(version, 2) AS INTEGER)", args)
        return [TemplateVersion(**dict(r)) for r in rows]

    def newest_version(self, template: str) -> TemplateVersion | None:
        versions = self.template_versions(template)
        return versions[-1] if versions else None

    def delete_template_version(self, template: str, version: str, here: str = "") -> None:
        """The version goes; so does the copy on `here` (the appliance that destroyed its snapshot). Copies
        elsewhere are marked `deleting`: each of those appliances destroys its snapshot, then the row."""
        with self._tx() as db:
            db.execute("DELETE FROM template_versions WHERE template = ? AND version = ?", (template, version))
            db.execute("DELETE FROM template_copies WHERE template = ? AND version = ? AND appliance = ?",
                       (template, version, here))
            db.execute("UPDATE template_copies SET state = 'deleting', detail = 'version deleted' "
                       "WHERE template = ? AND version = ?", (template, version))
            left = db.execute("SELECT 1 FROM template_versions WHERE template = ?", (template,)).fetchone()
            if left is None:
                db.execute("DELETE FROM templates WHERE name = ?", (template,))

    def clones_of(self, template: str, version: str | None = None) -> list[str]:
        """Servers whose root or restore point was cloned from the template (version)."""
        sql = "SELECT uuid FROM servers WHERE template = ?"
        args: list[str] = [template]
        if version is not None:
            sql += " AND version = ?"
            args.append(version)
        # a prefix compared exactly, not LIKE: PostgreSQL's is case-sensitive and SQLite's is not
        prefix = f"{template}@{version}" if version is not None else f"{template}@"
        vsql = "SELECT server FROM volumes WHERE kind IN ('os', 'prev') AND "
        vsql += "origin = ?" if version is not None else "substr(origin, 1, ?) = ?"
        vargs = (prefix,) if version is not None else (len(prefix), prefix)
        found = {r[0] for r in self._all(sql, args)} | {r[0] for r in self._all(vsql, vargs)}
        return sorted(found)

    # --- users and tokens ------------------------------------------------------------------------

    def put_user(self, user: User) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "max_volumes = excluded.max_volumes, max_data_gb = excluded.max_data_gb",
                (user.name, user.max_volumes, user.max_data_gb, self._clock()),
            )

    def user(self, name: str) -> User | None:
        rows = self._all("SELECT name, max_volumes, max_data_gb FROM users WHERE name = ?", (name,))
        return User(**dict(rows[0])) if rows else None

    def users(self) -> list[User]:
        return [User(**dict(r)) for r in self._all("SELECT name, max_volumes, max_data_gb FROM users ORDER BY name")]

    def delete_user(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM servers WHERE owner = ?", (name,)).fetchone():
                raise Conflict(f"user {name} still owns servers")
            db.execute("DELETE FROM tokens WHERE owner = ?", (name,))
            db.execute("DELETE FROM users WHERE name = ?", (name,))

    def usage(self, owner: str) -> tuple[int, int]:
        """(volumes, data bytes) held by the owner's servers, every state but deleted counted. Restore
        points and OS-volume snapshots count as volumes: each holds space of its own."""
        row = self._all(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN v.kind = 'data' THEN v.size ELSE 0 END), 0) "
            "FROM volumes v JOIN servers s ON s.uuid = v.server WHERE s.owner = ?",
            (owner,),
        )[0]
        snaps = self._all("SELECT COUNT(*) FROM snapshots n JOIN servers s ON s.uuid = n.server WHERE s.owner = ?",
                          (owner,))[0]
        return int(row[0]) + int(snaps[0]), int(row[1])

    def add_token(self, token: str, owner: str | None, admin: bool, scope: str = "") -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tokens (hash, owner, admin, created_at, scope) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(hash) DO UPDATE SET owner = excluded.owner, admin = excluded.admin, "
                       "created_at = excluded.created_at, scope = excluded.scope",
                       (hash_token(token), owner, int(admin), self._clock(), scope))

    def token(self, token: str) -> tuple[str | None, bool] | None:
        rows = self._all("SELECT owner, admin FROM tokens WHERE hash = ?", (hash_token(token),))
        return (rows[0]["owner"], bool(rows[0]["admin"])) if rows else None

    def token_with_scope(self, token: str) -> tuple[str | None, bool, str] | None:
        """(owner, admin, scope) of a token: scope '' = all its owner may do, 'read' = look, not touch."""
        rows = self._all("SELECT owner, admin, scope FROM tokens WHERE hash = ?", (hash_token(token),))
        return (rows[0]["owner"], bool(rows[0]["admin"]), str(rows[0]["scope"])) if rows else None

    def has_admin_token(self) -> bool:
        return bool(self._all("SELECT 1 FROM tokens WHERE admin = 1 LIMIT 1"))

    # --- servers and volumes ---------------------------------------------------------------------

    def create_server(self, server: ServerRow, volumes: Sequence[VolumeRow],
                      quota_check: Callable[[int, int], str | None] | None = None) -> None:
        """Record a server and its volumes in one transaction: the quota is reserved by the rows
        themselves, checked inside the same transaction so two creates cannot both slip under it."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM servers WHERE uuid = ?", (server.uuid,)).fetchone():
                raise Conflict(f"server {server.uuid} already exists")
            for mac in server.macs:
                row = db.execute("SELECT server FROM server_macs WHERE mac = ?", (mac,)).fetchone()
                if row:
                    raise Conflict(f"MAC {mac} already belongs to server {row[0]}")
            if quota_check is not None:
                used_n, used_bytes = self.usage(server.owner)
                new_bytes = sum(v.size for v in volumes if v.kind == "data")
                if (problem := quota_check(used_n + len(volumes), used_bytes + new_bytes)) is not None:
                    raise QuotaExceeded(problem)
            db.execute(
                "INSERT INTO servers (uuid, template, version, profile, owner, state, reason, created_at, "
                "updated_at, hostname, address, chap_user, chap_secret, chap_mutual_user, chap_mutual_secret, "
                "labels, bmc_url, bmc_user, bmc_password, appliance, moving_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (server.uuid, server.template, server.version, server.profile, server.owner, server.state,
                 server.reason, server.created_at, server.updated_at, server.hostname, server.address,
                 server.chap_user, server.chap_secret, server.chap_mutual_user, server.chap_mutual_secret,
                 server.labels, server.bmc_url, server.bmc_user, server.bmc_password, server.appliance,
                 server.moving_to),
            )
            db.executemany("INSERT INTO server_macs VALUES (?, ?)", [(m, server.uuid) for m in server.macs])
            self._insert_volumes(db, volumes)

    def add_volume(self, volume: VolumeRow, owner: str,
                   quota_check: Callable[[int, int], str | None] | None = None) -> None:
        with self._tx() as db:
            if quota_check is not None:
                used_n, used_bytes = self.usage(owner)
                # an OS root (an upgrade's new one) counts as a volume, not as data bytes
                data = volume.size if volume.kind == "data" else 0
                if (problem := quota_check(used_n + 1, used_bytes + data)) is not None:
                    raise QuotaExceeded(problem)
            self._insert_volumes(db, [volume])

    def _insert_volumes(self, db: Tx, volumes: Sequence[VolumeRow]) -> None:
        try:
            db.executemany(
                "INSERT INTO volumes (name, server, kind, idx, size, state, serial, created_at, origin) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(v.name, v.server, v.kind, v.idx, v.size, v.state, v.serial, time.time(), v.origin)
                 for v in volumes],
            )
        except self._engine.integrity_errors as e:
            raise Conflict(f"volume already exists: {e}") from None

    def set_server_state(self, uuid: str, state: str, reason: str = "") -> None:
        """Only along a move that domain/states.py allows: anything else is a workflow bug (Conflict)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM servers WHERE uuid = ?", (uuid,)).fetchone()
            if row is not None and not may_move(row[0], state):
                raise Conflict(f"server {uuid}: no move from {row[0]} to {state}")
            db.execute("UPDATE servers SET state = ?, reason = ?, updated_at = ? WHERE uuid = ?",
                       (state, reason, self._clock(), uuid))

    def set_volume_state(self, name: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET state = ? WHERE name = ?", (state, name))

    def delete_volume(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    def delete_server(self, uuid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM servers WHERE uuid = ?", (uuid,))

    def _servers_where(self, where: str, params: tuple[object, ...]) -> list[ServerRow]:
        # One query however many servers (a row per MAC, not a query more per server): the boot index
        # and every export apply read all of them, and one statement sees one state on either engine.
        rows = self._all(f"SELECT s.*, m.mac AS mac FROM servers s LEFT JOIN server_macs m ON m.server = s.uuid "
                         f"{where} ORDER BY s.created_at, s.uuid, m.mac", params)
        servers: dict[str, dict[str, Any]] = {}
        macs: dict[str, list[str]] = {}
        for r in rows:
            columns = dict(r)
            mac = columns.pop("mac")
            servers.setdefault(columns["uuid"], columns)
            if mac is not None:
                macs.setdefault(columns["uuid"], []).append(mac)
        return [ServerRow(macs=tuple(macs.get(uuid, ())), **columns) for uuid, columns in servers.items()]

    def server(self, uuid: str) -> ServerRow | None:
        rows = self._servers_where("WHERE uuid = ?", (uuid,))
        return rows[0] if rows else None

    def servers(self, owner: str | None = None, *, appliance: str | None = None) -> list[ServerRow]:
        """All servers, or those of an owner, or on an appliance, or both."""
        return self._servers_where(*_where(owner=owner, appliance=appliance))

    def volumes(self, server: str | None = None) -> list[VolumeRow]:
        if server is None:
            rows = self._all(f"SELECT {_VOLUME_COLUMNS} FROM volumes ORDER BY server, idx")
        else:
            rows = self._all(f"SELECT {_VOLUME_COLUMNS} FROM volumes "
                             "WHERE server = ? ORDER BY idx", (server,))
        return [VolumeRow(**dict(r)) for r in rows]

    def volume(self, name: str) -> VolumeRow | None:
        rows = self._all(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE name = ?", (name,))
        return VolumeRow(**dict(rows[0])) if rows else None

    # --- the fleet lifecycle: restore points, snapshots, labels --------------------------------------

    def swap_root(self, uuid: str, new_os: str, template: str, version: str, secrets: dict[str, str]) -> str | None:
        """One transaction: the server's OS volume becomes its restore point, `new_os` (a row made by the
        rebuild, idx NEW_ROOT_IDX) its OS volume at index 0, and the server records the template version
        (and CHAP secrets rotated with it). An older restore point is marked `deleting` and its name
        returned, for the caller to destroy once the new root is exported."""
        with self._tx() as db:
            old = db.execute("SELECT name FROM volumes WHERE server = ? AND kind = 'prev'", (uuid,)).fetchone()
            if old is not None:
                db.execute("UPDATE volumes SET idx = ?, state = 'deleting' WHERE name = ?", (GONE_IDX, old[0]))
            db.execute("UPDATE volumes SET kind = 'prev', idx = ? WHERE server = ? AND kind = 'os' AND idx = 0",
                       (PREV_IDX, uuid))
            db.execute("UPDATE volumes SET idx = 0, state = 'available' WHERE name = ?", (new_os,))
            self._set_root(db, uuid, template, version, secrets)
            return None if old is None else str(old[0])

    def swap_back(self, uuid: str, template: str, version: str, secrets: dict[str, str]) -> None:
        """One transaction: the restore point and the OS volume trade places (a rollback, or undoing a
        rebuild's swap); the server records the template version of its root again."""
        with self._tx() as db:
            db.execute("UPDATE volumes SET kind = 'prev', idx = ? WHERE server = ? AND kind = 'os' AND idx = 0",
                       (SWAP_IDX, uuid))
            db.execute("UPDATE volumes SET kind = 'os', idx = 0 WHERE server = ? AND kind = 'prev' AND idx = ?",
                       (uuid, PREV_IDX))
            db.execute("UPDATE volumes SET idx = ? WHERE server = ? AND idx = ?", (PREV_IDX, uuid, SWAP_IDX))
            self._set_root(db, uuid, template, version, secrets)

    def _set_root(self, db: Tx, uuid: str, template: str, version: str,
                  secrets: dict[str, str]) -> None:
        sets = ["template = ?", "version = ?", "updated_at = ?"]
        args: list[object] = [template, version, self._clock()]
        for key in ("chap_secret", "chap_mutual_secret"):
            if key in secrets:
                sets.append(f"{key} = ?")
                args.append(secrets[key])
        db.execute(f"UPDATE servers SET {', '.join(sets)} WHERE uuid = ?", (*args, uuid))

    def revive_prev(self, name: str) -> None:
        """An older restore point that a failed swap had marked going is the restore point again."""
        with self._tx() as db:
            db.execute("UPDATE volumes SET idx = ?, state = 'available' WHERE name = ? AND kind = 'prev'",
                       (PREV_IDX, name))

    def add_snapshot(self, uuid: str, name: str, volume: str, owner: str,
                     quota_check: Callable[[int, int], str | None] | None = None) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE server = ? AND name = ?", (uuid, name)).fetchone():
                raise Conflict(f"server {uuid} already has a snapshot {name}")
            if quota_check is not None:
                used_n, used_bytes = self.usage(owner)
                if (problem := quota_check(used_n + 1, used_bytes)) is not None:
                    raise QuotaExceeded(problem)
            db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)", (uuid, name, volume, self._clock()))

    def snapshots_of(self, uuid: str) -> list[tuple[str, str, float]]:
        """(name, volume, created_at), oldest first."""
        rows = self._all("SELECT name, volume, created_at FROM snapshots WHERE server = ? ORDER BY created_at, name",
                         (uuid,))
        return [(r[0], r[1], float(r[2])) for r in rows]

    def delete_snapshot(self, uuid: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE server = ? AND name = ?", (uuid, name))

    def set_labels(self, uuid: str, labels: dict[str, str]) -> None:
        with self._tx() as db:
            db.execute("UPDATE servers SET labels = ?, updated_at = ? WHERE uuid = ?",
                       (json.dumps(labels, sort_keys=True), self._clock(), uuid))

    def set_bmc(self, uuid: str, url: str, user: str, password: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE servers SET bmc_url = ?, bmc_user = ?, bmc_password = ?, updated_at = ? "
                       "WHERE uuid = ?", (url, user, password, self._clock(), uuid))

    # --- the fleet: appliances, where servers live, template copies -----------------------------------

    def register_appliance(self, row: ApplianceRow) -> None:
        """Upsert by name. A restart re-registers everything but disabled/disabled_reason: an operator's
        setting outlives the appliance's restarts."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO appliances (name, api_url, advertise, labels, capacity_bytes, free_bytes, disabled, "
                "disabled_reason, answers_unknown, version, started_at, heartbeat_at, tls_fingerprint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "api_url = excluded.api_url, advertise = excluded.advertise, labels = excluded.labels, "
                "capacity_bytes = excluded.capacity_bytes, free_bytes = excluded.free_bytes, "
                "answers_unknown = excluded.answers_unknown, version = excluded.version, "
                "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
                "tls_fingerprint = excluded.tls_fingerprint",
                (row.name, row.api_url, row.advertise, row.labels, row.capacity_bytes, row.free_bytes,
                 int(row.disabled), row.disabled_reason, int(row.answers_unknown), row.version, row.started_at,
                 row.heartbeat_at, row.tls_fingerprint),
            )

    def heartbeat(self, name: str, at: float, capacity_bytes: int, free_bytes: int) -> bool:
        """False when no such appliance (forgotten while it ran: it must register again)."""
        with self._tx() as db:
            return db.execute("UPDATE appliances SET heartbeat_at = ?, capacity_bytes = ?, free_bytes = ? "
                              "WHERE name = ?", (at, capacity_bytes, free_bytes, name)).rowcount > 0

    @staticmethod
    def _appliance_row(r: Any) -> ApplianceRow:
        d = dict(r)
        return ApplianceRow(**{**d, "disabled": bool(d["disabled"]), "answers_unknown": bool(d["answers_unknown"])})

    def appliances(self) -> list[ApplianceRow]:
        return [self._appliance_row(r) for r in self._all("SELECT * FROM appliances ORDER BY name")]

    def appliance(self, name: str) -> ApplianceRow | None:
        rows = self._all("SELECT * FROM appliances WHERE name = ?", (name,))
        return self._appliance_row(rows[0]) if rows else None

    def set_appliance_disabled(self, name: str, disabled: bool, reason: str = "") -> bool:
        """False when no such appliance."""
        with self._tx() as db:
            return db.execute("UPDATE appliances SET disabled = ?, disabled_reason = ? WHERE name = ?",
                              (int(disabled), reason if disabled else "", name)).rowcount > 0

    def forget_appliance(self, name: str) -> None:
        """Conflict while a server's volumes live there or are on their way."""
        with self._tx() as db:
            row = db.execute("SELECT uuid FROM servers WHERE appliance = ? OR moving_to = ? ORDER BY uuid LIMIT 1",
                             (name, name)).fetchone()
            if row is not None:
                raise Conflict(f"appliance {name} still holds servers (server {row[0]})")
            db.execute("DELETE FROM template_copies WHERE appliance = ?", (name,))
            db.execute("DELETE FROM appliances WHERE name = ?", (name,))

    def claim_unowned_servers(self, name: str, every: bool = False) -> int:
        """Servers made before fleets belong to the first appliance that starts on the store: how many it got.
        `every`: all servers, whatever appliance they name (a store only one appliance can open, SQLite:
        the same appliance under a new name — a renamed host must not find its own servers foreign)."""
        with self._tx() as db:
            if every:
                db.execute("DELETE FROM appliances WHERE name != ?", (name,))
                return int(db.execute("UPDATE servers SET appliance = ?, moving_to = '' WHERE appliance != ?",
                                      (name, name)).rowcount)
            return int(db.execute("UPDATE servers SET appliance = ? WHERE appliance = ''", (name,)).rowcount)

    def placed(self, os_reserve: int = 0) -> dict[str, tuple[int, int]]:
        """Appliance -> (servers, provisioned bytes). Data volumes count at their size (promised in full);
        an OS clone, restore point or any other volume at `os_reserve` (a clone holds only what its node
        wrote, its size is the template's virtual one). A server on the move counts on both ends: its
        target's space is taken from the move's start. Unclaimed servers (appliance '') are not counted."""
        per_server = ("COALESCE((SELECT SUM(CASE WHEN v.kind = 'data' THEN v.size ELSE ? END) FROM volumes v "
                      "WHERE v.server = s.uuid), 0)")
        rows = self._all(
            "SELECT place, COUNT(*), COALESCE(SUM(bytes), 0) FROM ("
            f"SELECT s.appliance AS place, {per_server} AS bytes FROM servers s WHERE s.appliance != '' "
            "UNION ALL "
            f"SELECT s.moving_to AS place, {per_server} AS bytes FROM servers s "
            "WHERE s.moving_to != '' AND s.moving_to != s.appliance"
            ") placed GROUP BY place ORDER BY place", (os_reserve, os_reserve))
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}

    def set_server_appliance(self, uuid: str, appliance: str) -> None:
        """The server's volumes are on `appliance` now: a move, if any, is over."""
        with self._tx() as db:
            db.execute("UPDATE servers SET appliance = ?, moving_to = '', updated_at = ? WHERE uuid = ?",
                       (appliance, self._clock(), uuid))

    def set_moving_to(self, uuid: str, appliance: str) -> None:
        """A move of the server's volumes to `appliance` begins ('' = called off)."""
        with self._tx() as db:
            db.execute("UPDATE servers SET moving_to = ?, updated_at = ? WHERE uuid = ?",
                       (appliance, self._clock(), uuid))

    def set_template_copy(self, row: TemplateCopyRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO template_copies (template, version, appliance, state, detail, checksum, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(template, version, appliance) DO UPDATE SET "
                "state = excluded.state, detail = excluded.detail, checksum = excluded.checksum, "
                "updated_at = excluded.updated_at",
                (row.template, row.version, row.appliance, row.state, row.detail, row.checksum, row.updated_at),
            )

    def template_copies(self, template: str | None = None, version: str | None = None) -> list[TemplateCopyRow]:
        where, args = _where(template=template, version=version)
        rows = self._all(f"SELECT * FROM template_copies {where} ORDER BY template, version, appliance", args)
        return [TemplateCopyRow(**dict(r)) for r in rows]

    def delete_template_copy(self, template: str, version: str, appliance: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM template_copies WHERE template = ? AND version = ? AND appliance = ?",
                       (template, version, appliance))

    # --- discovered nodes ------------------------------------------------------------------------

    def save_discovered(self, rows: Sequence[DiscoveredRow], keep: int) -> None:
        """Upsert a batch (each row's `count` is what was seen since the last save, added to the stored
        one; an empty address keeps the known one), then keep only the `keep` most recently seen."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO discovered (mac, uuid, arch, vendor_class, user_class, address, first_seen, last_seen, "
                "count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(mac) DO UPDATE SET uuid = excluded.uuid, "
                "arch = excluded.arch, vendor_class = excluded.vendor_class, user_class = excluded.user_class, "
                "address = CASE WHEN excluded.address != '' THEN excluded.address ELSE discovered.address END, "
                "first_seen = CASE WHEN excluded.first_seen < discovered.first_seen THEN excluded.first_seen "
                "ELSE discovered.first_seen END, "
                "last_seen = CASE WHEN excluded.last_seen > discovered.last_seen THEN excluded.last_seen "
                "ELSE discovered.last_seen END, count = discovered.count + excluded.count",
                [(r.mac, r.uuid, r.arch, r.vendor_class, r.user_class, r.address, r.first_seen, r.last_seen, r.count)
                 for r in rows])
            db.execute("DELETE FROM discovered WHERE mac NOT IN "
                       "(SELECT mac FROM discovered ORDER BY last_seen DESC, mac LIMIT ?)", (keep,))

    def discovered(self, limit: int = -1) -> list[DiscoveredRow]:
        """Most recently seen first; limit -1 = all."""
        sql = "SELECT * FROM discovered ORDER BY last_seen DESC, mac"
        rows = self._all(sql + " LIMIT ?", (limit,)) if limit >= 0 else self._all(sql)
        return [DiscoveredRow(**dict(r)) for r in rows]

    def discovered_node(self, mac: str) -> DiscoveredRow | None:
        rows = self._all("SELECT * FROM discovered WHERE mac = ?", (mac,))
        return DiscoveredRow(**dict(rows[0])) if rows else None

    def forget_discovered(self, mac: str) -> bool:
        """Whether there was such a record."""
        with self._tx() as db:
            return db.execute("DELETE FROM discovered WHERE mac = ?", (mac,)).rowcount > 0

    # --- services and events ---------------------------------------------------------------------

    def set_service(self, name: str, enabled: bool, appliance: str = "") -> None:
        """One appliance's switch (each appliance of a fleet switches its own services)."""
        with self._tx() as db:
            db.execute("INSERT INTO services (appliance, name, enabled) VALUES (?, ?, ?) "
                       "ON CONFLICT(appliance, name) DO UPDATE SET enabled = excluded.enabled",
                       (appliance, name, int(enabled)))

    def services(self, appliance: str = "") -> dict[str, bool]:
        """The appliance's switches; those set before fleets ('') where it has set none of its own."""
        rows = self._all("SELECT appliance, name, enabled FROM services WHERE appliance IN (?, '') "
                         "ORDER BY appliance", (appliance,))
        return {r[1]: bool(r[2]) for r in rows}  # '' sorts first: the appliance's own rows win

    def add_events(self, events: Sequence[tuple[int, float, str, str | None, dict[str, object]]],
                   appliance: str = "") -> None:
        """(id, at, kind, server, data) of one appliance: its bus's own ids, so that its stored and streamed
        ids are one sequence (each appliance of a fleet numbers its own)."""
        with self._tx() as db:
            db.executemany("INSERT INTO boot_events (appliance, id, at, kind, server, data) VALUES (?, ?, ?, ?, ?, ?) "
                           "ON CONFLICT DO NOTHING",
                           [(appliance, i, at, kind, server, json.dumps(data)) for i, at, kind, server, data in events])
            # Keep the table bounded: a boot storm must not grow the store without end.
            db.execute("DELETE FROM boot_events WHERE appliance = ? AND id <= "
                       "(SELECT MAX(id) FROM boot_events WHERE appliance = ?) - 100000", (appliance, appliance))

    def last_event_id(self, appliance: str = "") -> int:
        """The appliance's newest id, or the newest of before fleets ('') if higher: ids never go back."""
        return int(self._all("SELECT COALESCE(MAX(id), 0) FROM boot_events WHERE appliance IN (?, '')",
                             (appliance,))[0][0])

    def events(self, server: str | None = None, limit: int = 100) -> list[dict[str, object]]:
        """The newest `limit` events (of one server), oldest first, from every appliance (each names it)."""
        if server is None:
            rows = self._all("SELECT * FROM boot_events ORDER BY at DESC, id DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM boot_events WHERE server = ? ORDER BY at DESC, id DESC LIMIT ?",
                             (server, limit))
        return [{"id": r["id"], "at": r["at"], "kind": r["kind"], "server": r["server"],
                 **({"appliance": r["appliance"]} if r["appliance"] else {}), **json.loads(r["data"])}
                for r in reversed(rows)]


    # --- the audit log of API writes ------------------------------------------------------------------

    AUDIT_KEEP = 100_000  # rows kept; older ones go, like boot_events

    def add_audit(self, rows: Sequence[tuple[float, str, str, str, int, str]]) -> None:
        """(at, who, method, path, status, detail) rows, in one transaction; the table stays bounded."""
        with self._tx() as db:
            db.executemany("INSERT INTO audit (at, who, method, path, status, detail) VALUES (?, ?, ?, ?, ?, ?)",
                           rows)
            db.execute("DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (self.AUDIT_KEEP,))

    def audit(self, since: int | None = None, limit: int = 100) -> list[tuple[int, float, str, str, str, int, str]]:
        """(id, at, who, method, path, status, detail), oldest first: the `limit` rows after id `since`, or
        without `since` the newest `limit` rows."""
        sql = "SELECT id, at, who, method, path, status, detail FROM audit"
        if since is not None:
            rows = self._all(sql + " WHERE id > ? ORDER BY id LIMIT ?", (since, limit))
        else:
            rows = list(reversed(self._all(sql + " ORDER BY id DESC LIMIT ?", (limit,))))
        return [(int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), str(r[6])) for r in rows]


class AsyncStore:
    """Runs store calls on one worker thread so the database never blocks the event loop."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cello-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sync.close()
