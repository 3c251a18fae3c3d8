"""Serve-time facts of the host the appliance runs on: its first IPv4 address, the open-file limit the
TFTP transfers need, and the lock that keeps one appliance per state dir."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger("cello")


class StateDirBusy(RuntimeError):
    """Another process holds the state dir's lock."""


def raise_open_file_limit(needed: int) -> int:
    """Lift the soft limit on open files towards the hard one, to at least `needed`; returns the new one.

    A TFTP transfer holds two descriptors (its port and a twin connected to the client), so 512
    transfers alone outgrow the usual soft limit of 1024; the hard limit is the operator's to set.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return int(soft)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("open files: hard limit %d is below the %d that %s need", hard, needed,
                    "the configured TFTP transfers and services")
    return int(target)


def first_ipv4() -> str:
    """The first non-loopback IPv4 address of this host (read from the interfaces, no traffic sent)."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not address.startswith("127."):
                return address
    return "127.0.0.1"


def lock_state_dir(state_dir: Path) -> int:
    """Hold `<state_dir>/cello.lock` (flock) for this process's life; StartError if another holds it.

    One appliance per state dir: two would fight over one store, one tgtd and its state file, and a
    teardown must not run under a serving appliance that would put the exports straight back.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "cello.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(f"state dir {state_dir} is in use by another cello process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def host_label() -> str:
    """The host's name as a DNS label (an appliance's default name in its fleet)."""
    import re
    import socket

    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")[:63].strip("-")
    return label or "cello"
