"""A second host on the lab's boot LAN that is not a node: its own network namespace with a veth on the
lab's bridge and a static address outside the site DHCP's range (no DHCP client runs there).

```
netns cel-stranger : cel-x0 10.77.0.66/24 (veth, its peer cel-x0br on br0 of cel-site)
```

For the tests of what such a host can get from Cello knowing a node's MAC and UUID. Its interface can
wear the node's MAC (a spoofed one). Made and removed by the test, while it holds the lab (one lab at a
time on a machine, tests/system/lab.py); leftovers of a crashed run are removed before building.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.system.lab import BRIDGE, NS_SITE, Lab, LabError, in_ns, run

NS_STRANGER = "cel-stranger"
VETH_STRANGER = "cel-x0"
VETH_STRANGER_BR = "cel-x0br"
STRANGER_IP = "10.77.0.66"  # the site DHCP hands out .100-.150


@dataclass
class Stranger:
    """The host: run programs in it with `run`."""

    address: str
    mac: str | None
    logs: Path

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`argv` inside the stranger's namespace; never raises for an exit status (the caller asserts)."""
        done = in_ns(NS_STRANGER, *argv, check=False, timeout=timeout)
        with open(self.logs / "stranger.log", "a") as f:
            f.write(f"--- {' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}\n")
        return done


def remove_stranger() -> None:
    """Idempotent: the veth pair, then the namespace. The pair is deleted first and by name, because the
    kernel destroys a deleted namespace's devices later, asynchronously (a veth end still on br0 would
    make the next `ip link add` fail). Nothing outlives a `Stranger.run` (subprocess.run kills what times
    out), so no process holds the namespace."""
    if Path(f"/run/netns/{NS_STRANGER}").exists():
        in_ns(NS_STRANGER, "ip", "link", "del", VETH_STRANGER, check=False)
        run(["ip", "netns", "del", NS_STRANGER], check=False)
    if Path(f"/run/netns/{NS_SITE}").exists():
        in_ns(NS_SITE, "ip", "link", "del", VETH_STRANGER_BR, check=False)


@contextlib.contextmanager
def stranger_host(lab: Lab, *, mac: str | None = None, address: str = STRANGER_IP) -> Iterator[Stranger]:
    """A stranger on `lab`'s bridge (`mac`: its interface's MAC, e.g. a node's), removed afterwards."""
    if lab.dnsmasq is None:
        raise LabError("the lab is not up: the stranger joins its bridge")
    remove_stranger()
    try:
        run(["ip", "netns", "add", NS_STRANGER])
        in_ns(NS_STRANGER, "ip", "link", "set", "lo", "up")
        run(["ip", "link", "add", VETH_STRANGER, "netns", NS_STRANGER, "type", "veth",
             "peer", "name", VETH_STRANGER_BR, "netns", NS_SITE])
        in_ns(NS_SITE, "ip", "link", "set", VETH_STRANGER_BR, "master", BRIDGE)
        in_ns(NS_SITE, "ip", "link", "set", VETH_STRANGER_BR, "up")
        if mac is not None:
            in_ns(NS_STRANGER, "ip", "link", "set", "dev", VETH_STRANGER, "address", mac)
        in_ns(NS_STRANGER, "ip", "addr", "add", f"{address}/24", "dev", VETH_STRANGER)
        in_ns(NS_STRANGER, "ip", "link", "set", VETH_STRANGER, "up")
        yield Stranger(address, mac, lab.logs)
    finally:
        remove_stranger()
