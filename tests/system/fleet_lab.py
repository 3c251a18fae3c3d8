"""The fleet lab of issue 16's system test: three appliances on one site, sharing one PostgreSQL server.

```
netns cel-site : br0 10.77.0.1/24 + fd77::1/64, dnsmasq as the site DHCP, ctap0..ctapN (as in lab.py)
netns cel-fa   : cel-fa0 10.77.0.11/24 (veth, its peer cel-fa0br on br0) — `cello serve` "a", tgtd -C 78
netns cel-fb   : cel-fb0 10.77.0.12/24                                    — `cello serve` "b", tgtd -C 79
netns cel-fc   : cel-fc0 10.77.0.13/24                                    — `cello serve` "c", tgtd -C 80
PostgreSQL     : tests/pgserver.py's throwaway cluster, on a unix socket only (shared_store=True)
```

Each appliance has its own folder (cello.toml, state/), its own tgtd and the same admin token; its logs go
to the lab's one log folder with its name in the file name (cello-a.log, events-a.log, ...). The database
needs no network: the namespaces share the filesystem, so the socket reaches all three.

With `shared_store=False` each appliance keeps its own SQLite store and the config has no [store] or
[fleet] table (what `cello serve` accepts before issue 16); with True, every config points [store] at the
one database and carries its [fleet] table. `config(name)` renders the whole file; a test adds tables
with `extra_config[name]`.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tests.pgserver import PgServer
from tests.system.lab import (
    ADMIN_TOKEN,
    CELLO_IP,
    Appliance,
    EventLog,
    LabError,
    SiteLab,
    in_ns,
)

FLEET_SECRET = "cello-lab-fleet-secret-0123456789abcdef"  # the channel the appliances replicate over
STORE_DB = "cello"


@dataclass(frozen=True)
class Member:
    """One appliance of the fleet: its name there, its address on br0, its tgtd and its placement size."""

    name: str
    ip: str
    tgt_control_port: int  # not lab.py's 77, so the fleet's tgtds never meet a Lab's
    capacity_gb: int
    labels: Mapping[str, str] = field(default_factory=lambda: {"zone": "lab"})

    @property
    def ns(self) -> str:
        return f"cel-f{self.name}"


# Different capacities, so placement by capacity has something to choose by.
MEMBERS = (
    Member("a", "10.77.0.11", 78, 40),
    Member("b", "10.77.0.12", 79, 80),
    Member("c", "10.77.0.13", 80, 120),
)
assert all(m.ip != CELLO_IP for m in MEMBERS)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


@dataclass
class FleetLab(SiteLab):
    """The site plus one appliance per member, each in its own namespace; PostgreSQL when shared_store."""

    shared_store: bool = False  # [store] + [fleet] in every config: the keys issue 16 adds
    members: tuple[Member, ...] = MEMBERS
    extra_config: dict[str, str] = field(default_factory=dict)  # member name → TOML appended to its config
    secret: str = FLEET_SECRET
    heartbeat_s: float = 1.0
    down_after_s: float = 5.0
    postgres: PgServer | None = None
    _appliances: dict[str, Appliance] = field(init=False)
    _store_url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self._appliances = {
            m.name: Appliance(m.ns, m.ip, f"{m.ns}0", f"{m.ns}0br", m.tgt_control_port,
                              self.workdir / m.name, self.logs, log_tag=f"-{m.name}")
            for m in self.members
        }

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def appliances(self) -> list[Appliance]:
        return list(self._appliances.values())

    def appliance(self, name: str) -> Appliance:
        return self._appliances[name]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    # --- up, config ---------------------------------------------------------------------------------

    def up(self, lock_timeout: float = 600) -> None:
        """The site, the three namespaces and, with shared_store, the database; start() starts appliances."""
        super().up(lock_timeout)
        if self.shared_store:
            # Under the lock and after super().up(), so a failure here still finds down() stopping it.
            self.postgres = PgServer.start()
            self._record_postgres(self.postgres)
            self._store_url = self.postgres.create_database(STORE_DB)

    def _record_postgres(self, server: PgServer) -> None:
        """pg_ctl detaches the postmaster, so a crash of the test would leave it running: the next lab's
        remove_leftovers() ends it by the PID in its data folder's postmaster.pid."""
        for pid_file in server.root.glob("*/postmaster.pid"):
            self.record_daemon(int(pid_file.read_text().split()[0]), server.root)

    @property
    def store_url(self) -> str:
        if self.postgres is None:
            raise LabError("no shared store: FleetLab(shared_store=True) starts PostgreSQL in up()")
        return self._store_url

    def store_outage(self) -> None:
        """The database down, its data kept: what the appliances see when their store host goes away."""
        assert self.postgres is not None, "no shared store"
        self.postgres.halt()

    def store_back(self) -> None:
        assert self.postgres is not None, "no shared store"
        self.postgres.resume()
        self._record_postgres(self.postgres)  # a new postmaster, a new PID to end after a crash

    def fleet_tables(self, name: str) -> str:
        """[store] and [fleet] of member `name` (only rendered with shared_store)."""
        m = self.member(name)
        labels = ", ".join(f"{k} = {_toml_str(v)}" for k, v in m.labels.items())
        return (
            "[store]\n"
            f"url = {_toml_str(self.store_url)}\n"
            "[fleet]\n"
            f"name = {_toml_str(m.name)}\n"  # api_url: its default, https://<ip>:8443 (TLS is on beside a
            # non-loopback api.listen), the others pinning the certificate it registers
            f"labels = {{ {labels} }}\n"
            f"capacity_gb = {m.capacity_gb}\n"
            f"secret = {_toml_str(self.secret)}\n"
            f"heartbeat_s = {self.heartbeat_s}\n"
            f"down_after_s = {self.down_after_s}\n"
        )

    def config(self, name: str) -> str:
        """The whole cello.toml of member `name`: what Lab renders for one appliance, on the member's own
        addresses, with unknown nodes ignored (several appliances on one wire must not all answer a
        stranger), then [store] + [fleet] when shared_store, then extra_config[name]."""
        text = self.appliance(name).base_config(self.loader_roots(), dhcp_unknown="ignore")
        if self.shared_store:
            text += self.fleet_tables(name)
        return text + self.extra_config.get(name, "")

    # --- per appliance ------------------------------------------------------------------------------

    def start(self, name: str, timeout: float = 40) -> None:
        """(Re)writes its config and starts its `cello serve`; returns once its API answers."""
        self.appliance(name).start(self.config(name), timeout)

    def start_all(self, timeout: float = 40) -> None:
        """Every appliance at once (each start waits mostly on Python importing)."""
        with ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            for done in [pool.submit(self.start, name, timeout) for name in self.names]:
                done.result()

    def stop(self, name: str, timeout: float = 15) -> None:
        """SIGTERM; its tgtd keeps serving what it exports (teardown() ends that too)."""
        self.appliance(name).stop(timeout)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout: float = 15) -> int:
        return self.appliance(name).kill(sig, timeout)

    def teardown(self, name: str) -> None:
        """With its `cello serve` stopped: its exports removed and its tgtd ended — the appliance fully off."""
        self.appliance(name).teardown_exports()

    def link(self, name: str, up: bool) -> None:
        """Its veth up or down: the appliance unreachable on the site without stopping anything."""
        appliance = self.appliance(name)
        in_ns(appliance.ns, "ip", "link", "set", appliance.veth, "up" if up else "down")

    def api(self, name: str, method: str, path: str, body: object | None = None, *, timeout: float = 30,
            token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        """One API request to appliance `name` from a thread inside its namespace."""
        return self.appliance(name).api(method, path, body, timeout=timeout, token=token)

    def cli(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.appliance(name).cli(*args, timeout=timeout)

    def events(self, name: str) -> EventLog:
        events = self.appliance(name).events
        if events is None:
            raise LabError(f"appliance {name} is not running")
        return events

    def tgt_show(self, name: str) -> str:
        return self.appliance(name).tgt_show()

    def tgtd_pids(self, name: str) -> list[int]:
        return self.appliance(name).tgtd_pids()

    # --- teardown -----------------------------------------------------------------------------------

    def after_appliances_down(self) -> None:
        """The database, once no appliance holds it."""
        if self.postgres is not None:
            postgres, self.postgres = self.postgres, None
            postgres.stop()
