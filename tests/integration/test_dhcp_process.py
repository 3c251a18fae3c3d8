"""The responder in a child process (`dhcp/process.py`): scapy-built packets on loopback answered by the
child, what the parent changes reaching it, what it reports reaching the parent, and its lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dhcp import packet as p
from dhcp.process import ProcessProxyDHCP
from tests.dhcp_lab import PROFILES, StaticPolicy, make_spec
from tests.integration.test_api_stack import open_stack
from tests.integration.test_dhcp_proxy import BASE, Client, discover, uuid_for

ROOT = Path(__file__).resolve().parents[2]


class Lab:
    """A ProcessProxyDHCP on loopback ports with a StaticPolicy; `mirror()` copies the policy whole,
    as the appliance's snapshot is a new object for each index."""

    def __init__(self) -> None:
        self.client = Client()
        self.events: list[dict[str, object]] = []
        self.enabled = True
        self.policy = StaticPolicy(by_uuid={uuid_for(1): make_spec(uuid_for(1), PROFILES["ipxe"], BASE)})
        self.proxy = ProcessProxyDHCP(
            self.policy, "127.0.0.1", mirror=self.mirror, listen="127.0.0.1", port=0, pxe_port=0,
            reply_port=self.client.port, broadcast="127.0.0.1", raw_fallback=False,
            events=lambda k, f: self.events.append({"kind": k, **f}), enabled=lambda: self.enabled)

    def mirror(self) -> StaticPolicy:
        return dataclasses.replace(self.policy, by_uuid=dict(self.policy.by_uuid), by_mac=dict(self.policy.by_mac),
                                   seen={}, unknown_clients=[])

    @property
    def child(self) -> int:
        assert self.proxy._proc is not None
        return self.proxy._proc.pid


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    lab = Lab()
    await lab.proxy.start()
    yield lab
    await lab.proxy.stop()
    await lab.proxy.stop()  # idempotent
    lab.client.sock.close()


async def until(condition: Callable[[], object], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it has exited all the same)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_the_child_answers_with_the_boot_file(lab: Lab) -> None:
    assert [t for t in threading.enumerate() if t.name.startswith("cello-dhcp")] == []  # none in this process
    assert not _gone(lab.child) and lab.child != os.getpid()
    reply = await lab.client.ask(discover(1, 0, b"PXEClient:Arch:00000:UNDI:002001"), lab.proxy.bound["dhcp"][1])
    assert reply.message_type == p.DHCPOFFER and reply.xid == 0xC0000001
    assert reply.bootfile == "undionly.kpxe" and reply.siaddr == "127.0.0.1"
    await until(lambda: lab.events)
    assert lab.events == [{"kind": "dhcp", "server": uuid_for(1), "mac": reply.mac, "arch": 0,
                           "file": "undionly.kpxe", "client": "127.0.0.1", "reply": "offer", "uuid": uuid_for(1)}]
    await until(lambda: lab.proxy.stats.offers == 1)  # the child's counters reach the parent's Stats
    assert lab.proxy.stats.received == 1 and lab.proxy.stats.requests_by_arch == {0: 1}
    assert lab.proxy.stats.errors == 0


async def test_a_new_server_in_the_parent_reaches_the_child(lab: Lab) -> None:
    port = lab.proxy.bound["dhcp"][1]
    await lab.client.silent(discover(2, 7, b"PXEClient:Arch:00007:UNDI:003016"), port)  # not known yet
    lab.policy.by_uuid[uuid_for(2)] = make_spec(uuid_for(2), PROFILES["ipxe"], BASE)
    lab.proxy.mirror_changed()
    await asyncio.sleep(0.2)  # the snapshot is on its way: the child reads it between datagrams
    reply = await lab.client.ask(discover(2, 7, b"PXEClient:Arch:00007:UNDI:003016"), port)
    assert reply.message_type == p.DHCPOFFER and reply.bootfile == "ipxe.efi"


async def test_bindings_unknown_clients_and_events_reach_the_parent(lab: Lab) -> None:
    # The PXE REQUEST to :4011 says where the node is (its source): the parent's policy binds it.
    request = discover(1, 0, b"PXEClient:Arch:00000:UNDI:002001", mtype="request", ciaddr="127.0.0.1",
                       extra=[("vendor_specific", b"\x47\x04\x80\x00\x00\x00\xff")])
    reply = await lab.client.ask(request, lab.proxy.bound["pxe"][1])
    assert reply.message_type == p.DHCPACK
    await until(lambda: lab.policy.seen)
    assert lab.policy.seen == {uuid_for(1): "127.0.0.1"}
    await until(lambda: lab.events)
    assert lab.events[0]["reply"] == "ack" and lab.events[0]["server"] == uuid_for(1)
    # A node no record names: no answer, and the parent hears of it (discovered nodes).
    await lab.client.silent(discover(9, 0, b"PXEClient:Arch:00000:UNDI:002001"), lab.proxy.bound["dhcp"][1])
    await until(lambda: lab.policy.unknown_clients)
    (client,) = lab.policy.unknown_clients
    assert client.uuid == uuid_for(9) and client.arch == 0 and client.mac == "52:54:00:78:03:09"
    assert lab.policy.seen == {uuid_for(1): "127.0.0.1"}  # the parent's own policy, not the child's copy


async def test_the_service_switch_reaches_the_child(lab: Lab) -> None:
    port = lab.proxy.bound["dhcp"][1]
    lab.enabled = False
    lab.proxy.mirror_changed()  # as the composition root does on a switch's event
    await asyncio.sleep(0.1)
    await lab.client.silent(discover(1, 0, b"PXEClient"), port)
    lab.enabled = True  # this time nobody says so: the parent's poll of enabled() notices
    await asyncio.sleep(0.5)
    assert (await lab.client.ask(discover(1, 0, b"PXEClient"), port)).bootfile == "undionly.kpxe"
    await until(lambda: lab.proxy.stats.by_reason.get("service disabled") == 1)


async def test_stop_leaves_no_child_and_no_descriptor() -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    lab = Lab()
    await lab.proxy.start()
    await lab.proxy.start()  # a no-op: still the one child
    pid = lab.child
    await lab.proxy.stop()
    assert _gone(pid) and _reaped(pid)
    assert lab.proxy.bound == {} and lab.proxy._proc is None
    lab.client.sock.close()
    assert sorted(os.listdir("/proc/self/fd")) == fds  # sockets, socketpairs and pipes all closed
    await lab.proxy.start()  # and it starts again
    assert lab.proxy.bound["dhcp"][1] > 0 and not _gone(lab.child)
    pid = lab.child
    await lab.proxy.stop()
    assert _gone(pid)


async def test_a_child_that_dies_is_started_again(lab: Lab) -> None:
    first = lab.child
    os.kill(first, signal.SIGKILL)
    await until(lambda: lab.proxy._proc is not None and lab.proxy._proc.pid != first, seconds=10)
    assert lab.proxy.restarts == 1
    reply = await lab.client.ask(discover(1, 0, b"PXEClient"), lab.proxy.bound["dhcp"][1], wait=5)
    assert reply.bootfile == "undionly.kpxe"  # on the same sockets


async def test_a_child_ended_by_the_parent_leaves_the_sockets_to_the_next(lab: Lab) -> None:
    """A child that ends on its control socket's EOF does not shut the shared sockets down (a socket's
    shutdown is the socket's, in every process that holds it): the next child on them still answers."""
    port = lab.proxy.bound["dhcp"][1]
    first = lab.child
    await lab.proxy._end_child()
    assert _gone(first)
    await lab.proxy._spawn()
    reply = await lab.client.ask(discover(1, 0, b"PXEClient"), port, wait=5)
    assert reply.bootfile == "undionly.kpxe"


async def test_a_storm_during_a_respawn_is_answered_and_reported(lab: Lab) -> None:
    """DISCOVERs queued while a new child starts are served by its threads at once, so their reports can
    reach the parent before the child's "ready": the start takes them as reports, not as a failure."""
    port = lab.proxy.bound["dhcp"][1]
    os.kill(lab.child, signal.SIGKILL)
    await until(lambda: lab.proxy._proc is None, seconds=10)  # the parent has seen it die
    lab.events.clear()
    for _ in range(20):  # queued on the socket before the next child exists
        lab.client.sock.sendto(discover(1, 0, b"PXEClient"), ("127.0.0.1", port))
    await until(lambda: len(lab.events) == 20, seconds=15)
    assert lab.proxy.restarts == 1 and lab.proxy._proc is not None and not _gone(lab.child)
    reply = await lab.client.ask(discover(1, 0, b"PXEClient"), port, wait=5)
    assert reply.bootfile == "undionly.kpxe"


PARENT = textwrap.dedent("""
    import asyncio, sys
    from dhcp.process import ProcessProxyDHCP
    from tests.dhcp_lab import StaticPolicy

    async def main() -> None:
        policy = StaticPolicy()
        proxy = ProcessProxyDHCP(policy, "127.0.0.1", mirror=lambda: policy, listen="127.0.0.1", port=0,
                                 pxe_port=0, raw_fallback=False)
        await proxy.start()
        print(proxy._proc.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_the_child_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())  # the parent prints it once its child serves
        assert not _gone(child)
        parent.kill()  # SIGKILL: no stop(), no cleanup of any kind
        parent.wait()
        deadline = time.monotonic() + 5
        while not _gone(child):
            assert time.monotonic() < deadline, "the child outlived its parent by 5 s"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait()


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


async def test_the_appliance_wires_its_policy_and_switch_to_the_child(tmp_path: Path) -> None:
    """`[dhcp] responder = "process"` in the composition root: a server created through the API reaches the
    child (the boot index's listener), the binding its :4011 request names reaches the parent's policy,
    and the dhcp service switch (the event bus's observer) silences the child."""
    dhcp_port, pxe_port = _free_udp_ports(2)
    sections = {"dhcp": f'listen = "127.0.0.1"\nport = {dhcp_port}\npxe_port = {pxe_port}\nresponder = "process"'}
    async with open_stack(tmp_path, exports="memory", sections=sections) as s:
        await s.add_user("alice")
        proxy = s.appliance._make_dhcp()
        assert isinstance(proxy, ProcessProxyDHCP)
        client = Client()
        await proxy.start()
        try:
            mac, uuid = "52:54:00:78:03:05", uuid_for(5)
            request = discover(5, 0, b"PXEClient:Arch:00000:UNDI:002001", mtype="request", ciaddr="127.0.0.1",
                               extra=[("vendor_specific", b"\x47\x04\x80\x00\x00\x00\xff")])
            await client.silent(request, pxe_port)  # no such server yet
            status, body = await s.create(uuid, macs=[mac])
            assert status == 202, body
            assert (await s.wait_state(uuid))["state"] == "available"
            await s.domain.policy.settled()
            await asyncio.sleep(0.3)  # the new snapshot on its way to the child
            reply = await client.ask(request, pxe_port)
            assert reply.message_type == p.DHCPACK and reply.bootfile == "undionly.kpxe"
            await until(lambda: s.domain.policy.bindings.address_of_mac(mac) == "127.0.0.1")
            status, body = await s.req("PUT", "/api/v1/services/dhcp", json={"enabled": False})
            assert status == 200, body
            await asyncio.sleep(0.1)
            await client.silent(request, pxe_port)
        finally:
            await proxy.stop()
            client.sock.close()
        assert proxy.stats.errors == 0 and proxy.stats.acks == 1


def _proxy_on(lab: Lab, port: int, pxe_port: int) -> ProcessProxyDHCP:
    return ProcessProxyDHCP(lab.policy, "127.0.0.1", mirror=lab.mirror, listen="127.0.0.1", port=port,
                            pxe_port=pxe_port, reply_port=lab.client.port, broadcast="127.0.0.1",
                            raw_fallback=False, enabled=lambda: True)


async def test_a_start_waits_a_moment_for_ports_a_crashed_run_still_holds() -> None:
    """After a crash, the old responder process holds :67 until it has seen its control socket's EOF:
    a restart that comes at once waits for it (test_serve_restart restarts right after a SIGKILL)."""
    lab = Lab()
    port, pxe_port = _free_udp_ports(2)
    old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old.bind(("127.0.0.1", port))
    asyncio.get_running_loop().call_later(0.3, old.close)
    proxy = _proxy_on(lab, port, pxe_port)
    try:
        await proxy.start()
        assert proxy.bound["dhcp"] == ("127.0.0.1", port) and proxy.bound["pxe"] == ("127.0.0.1", pxe_port)
    finally:
        await proxy.stop()
        old.close()
        lab.client.sock.close()


async def test_a_port_held_for_longer_is_refused_with_its_bind_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dhcp.process._PORTS_GRACE_SECONDS", 0.3)
    lab = Lab()
    port, pxe_port = _free_udp_ports(2)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", port))
    proxy = _proxy_on(lab, port, pxe_port)
    started = time.monotonic()
    try:
        with pytest.raises(OSError, match="in use"):
            await proxy.start()
        assert time.monotonic() - started >= 0.3
        assert proxy._sockets == [] and proxy._proc is None  # nothing half-made: :4011 let go as well
        free = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        free.bind(("127.0.0.1", pxe_port))
        free.close()
    finally:
        await proxy.stop()
        other.close()
        lab.client.sock.close()
