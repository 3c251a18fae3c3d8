"""The proxyDHCP responder in a process of its own (`[dhcp] responder = "process"`, issue 15).

On its own threads the responder still shares the interpreter's GIL with the main loop (TFTP, HTTP,
the API, and the loop's work on the responder's reports): at 2,000 DISCOVERs/s under full TFTP+HTTP
load its p99 was 35 ms. Here the parent (the appliance) binds the sockets as `ProxyDHCP` does
(privileged ports, SO_BINDTODEVICE, the receive buffer) and starts `python -m dhcp.process`, which
serves them with `ProxyDHCP.handle()` on blocking threads of its own interpreter. A fresh interpreter
(subprocess with pass_fds), not a fork: the appliance is a threaded asyncio process, and a fork copies
its loop, its locks held by other threads and every descriptor.

The child answers from a mirror: a picklable snapshot of what the policy's `boot_spec` reads
(`mirror()`, e.g. `domain.bootpolicy.ApplianceBootPolicy.snapshot`) and the `enabled()` flag, sent on a
stream socketpair at start and again on `mirror_changed()` (the composition root calls it when the
boot index is swapped and when the service switch changes; `enabled()` is also re-read every
`_ENABLED_POLL_SECONDS`). `mirror()` must return a new object whenever anything in it changed.

What the child reports (`Report`: bindings, unknown clients, boot events) comes back one message per
report on a SOCK_SEQPACKET socketpair (atomic messages, no framing), sent without blocking: when the
parent's loop has not read the last few MiB, the report is dropped and counted (`reports_dropped`),
never waited for. Its `Stats` follow every `_STATS_SECONDS` and at the end; /metrics reads the parent's
copy. Ordering: the child sends a datagram's reports before its reply, so the report is in the
parent's socket before the client can have the reply; the parent reads it with `add_reader`, and the
kernel's epoll lists ready descriptors in the order they became ready, so the loop turn that sees the
node's TFTP or HTTP request runs the report reader first.

Lifetime: the child ends when its control socket reaches EOF — `stop()` closes it, and so does the
kernel when the parent dies, however it dies (PR_SET_PDEATHSIG would follow the parent's thread that
started the child, not the process). A child that exits on its own is logged and started again after
`_RESPAWN_SECONDS` on the same sockets (the parent keeps them open for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bootfiles.spec import BootPolicy, BootSpec, PxeClient

from . import pxe
from .proxy import SO_RCVBUFFORCE, Address, ProxyDHCP, Report, Stats
from .raw import RawListener

log = logging.getLogger("cello.dhcp")

_FRAME = struct.Struct("!I")  # a control frame: its length, then a pickle
_REPORT_BUFFER = 4 * 1024 * 1024  # reports in flight to a busy parent before they are dropped
_SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>
_MAX_MESSAGE = 65536  # a report or a stats message (each well under this)
_READ_BATCH = 1024  # report messages read per wake-up before yielding to the loop
_STATS_SECONDS = 0.25
_ENABLED_POLL_SECONDS = 0.25
_PORTS_GRACE_SECONDS = 2.0  # a crashed appliance's responder process ends well within this (see _bind_when_free)
_START_SECONDS = 20.0  # an interpreter start and the first snapshot's unpickling, on a loaded machine
_STOP_SECONDS = 5.0
_RESPAWN_SECONDS = 1.0
# The child's niceness, when it may raise its priority (root or CAP_SYS_NICE): it needs little CPU (a
# few per cent of a core at 2,000 requests/s) but needs it at once, and on a machine whose cores TFTP,
# HTTP and their clients fill, waiting for a turn of the scheduler is most of a loaded reply's time.
RESPONDER_NICE = -10
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


class SpecSource(Protocol):
    """What the child answers from: the policy's `boot_spec`, on a picklable snapshot."""

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None: ...


@dataclass(frozen=True)
class ChildSettings:
    """The child's first control frame: how to answer, on which descriptors (kept by pass_fds)."""

    advertise: str
    port: int
    reply_port: int
    interface: str
    broadcast: str
    pxe_config: pxe.PxeConfig
    events: bool  # report boot events (the parent has an event sink)
    dhcp_fd: int  # -1: :67 is taken, open the raw listener instead
    pxe_fd: int
    log_level: int
    nice: int  # the niceness the child sets itself to, if it may


class ProcessProxyDHCP(ProxyDHCP):
    """`ProxyDHCP` whose datagrams are answered by a child process; `mirror()` is what it answers from.
    Its `stats`, `bound` and `raw_mode` are the child's, as the thread and loop modes have their own."""

    def __init__(self, policy: BootPolicy, advertise: str, *, mirror: Callable[[], SpecSource],
                 python: str = sys.executable, nice: int = RESPONDER_NICE, **options: Any) -> None:
        super().__init__(policy, advertise, own_thread=False, **options)
        self.mirror = mirror
        self.python = python
        self.nice = nice
        self.restarts = 0  # children that exited on their own and were started again
        self._proc: asyncio.subprocess.Process | None = None
        self._ctl: socket.socket | None = None
        self._reports_in: socket.socket | None = None
        self._raw_wanted = False
        self._ending = False
        self._sender: asyncio.Task[None] | None = None
        self._respawn: asyncio.Task[None] | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._mirror_dirty = False
        self._sent_snapshot: SpecSource | None = None
        self._sent_enabled: bool | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sockets:
            return
        self._loop = asyncio.get_running_loop()
        self._ending = False
        try:
            # When :67 is taken, the child opens the raw listener (it has the parent's privileges).
            self._raw_wanted = await self._bind_when_free() is not None
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        self._poll = self._loop.call_later(_ENABLED_POLL_SECONDS, self._poll_enabled)
        log.info("proxyDHCP on %s (advertise %s%s, own process %d)", self.bound, self.advertise,
                 ", raw :67" * self.raw_mode, self._proc.pid if self._proc else 0)

    async def _bind_when_free(self) -> OSError | None:
        """`_bind_ports`, tried again for a moment while a port is in use: the responder process of an
        appliance that crashed (SIGKILL, OOM) ends at its control socket's EOF, but until it has, it
        still holds the ports, and a supervisor's restart comes at once. A port held for longer is
        another program's: its error (or the raw fallback) as before, _PORTS_GRACE_SECONDS later."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PORTS_GRACE_SECONDS
        while True:
            try:
                taken = self._bind_ports()
            except OSError as e:
                if e.errno != errno.EADDRINUSE or loop.time() >= deadline:
                    raise
            else:
                if taken is None or loop.time() >= deadline:
                    return taken
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            self.bound.clear()
            await asyncio.sleep(0.05)

    async def _spawn(self) -> None:
        """Start a child on the bound sockets and wait until it serves them (or says why it cannot)."""
        loop = asyncio.get_running_loop()
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reports, reports_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _set_buffer(reports_child, _SO_SNDBUFFORCE, socket.SO_SNDBUF)
            _set_buffer(reports, SO_RCVBUFFORCE, socket.SO_RCVBUF)
            dhcp_fd = -1 if self._raw_wanted else self._sockets[0].fileno()
            pass_fds = [ctl_child.fileno(), reports_child.fileno(), *(s.fileno() for s in self._sockets)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
            self._proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "dhcp.process", str(ctl_child.fileno()), str(reports_child.fileno()),
                pass_fds=pass_fds, stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            for sock in (ctl, reports):
                sock.close()
            raise
        finally:
            ctl_child.close()
            reports_child.close()
        self._ctl, self._reports_in = ctl, reports
        ctl.setblocking(False)
        reports.setblocking(False)
        settings = ChildSettings(
            advertise=self.advertise, port=self.port, reply_port=self.reply_port, interface=self.interface,
            broadcast=self.broadcast, pxe_config=self.pxe_config, events=self.events is not None,
            dhcp_fd=dhcp_fd, pxe_fd=self._sockets[-1].fileno(), log_level=log.getEffectiveLevel(), nice=self.nice)
        snapshot, enabled = self.mirror(), self.enabled()
        self._sent_snapshot, self._sent_enabled = snapshot, enabled
        try:
            await loop.sock_sendall(ctl, _frame(("settings", settings)) + _frame(("mirror", snapshot, enabled)))
            message = await asyncio.wait_for(self._until_ready(loop, reports), _START_SECONDS)
        except (OSError, TimeoutError) as e:
            raise RuntimeError(f"the DHCP responder process did not start: {e or 'no answer'}") from e
        if message[0] != "ready":
            raise RuntimeError(f"the DHCP responder process did not start: {message[1]}")
        if self._raw_wanted:
            self.raw_mode = True
            self.bound["dhcp"] = (f"raw:{message[1]}", self.port)
        loop.add_reader(reports.fileno(), self._on_reports)

    async def _until_ready(self, loop: asyncio.AbstractEventLoop, reports: socket.socket) -> tuple[Any, ...]:
        """The child's "ready" or "failed". Its threads serve from the moment they start, so in a storm
        a datagram's report (or a stats message) can come first: it is applied, as any later one."""
        while True:
            data = await loop.sock_recv(reports, _MAX_MESSAGE)
            if not data:
                return ("failed", f"it exited (status {self._proc.returncode if self._proc else None})")
            message: tuple[Any, ...] = pickle.loads(data)
            if message[0] in ("ready", "failed"):
                return message
            self._apply(message)

    async def stop(self) -> None:
        self._ending = True
        for task in (self._sender, self._respawn):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._sender = self._respawn = None
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        await self._end_child()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.bound.clear()
        self.raw_mode = self._raw_wanted = False

    async def _end_child(self) -> None:
        """Close the control socket (the child's EOF), read what it still reports, reap it."""
        proc, self._proc = self._proc, None
        ctl, self._ctl = self._ctl, None
        reports, self._reports_in = self._reports_in, None
        loop = self._loop
        loop_open = loop is not None and not loop.is_closed()
        if reports is not None and loop_open:
            loop.remove_reader(reports.fileno())  # type: ignore[union-attr]
        if ctl is not None:
            ctl.close()
        deadline = time.monotonic() + _STOP_SECONDS
        if reports is not None:
            # Awaited, not a blocking receive: the loop goes on serving TFTP, HTTP and the API meanwhile.
            running = asyncio.get_running_loop()
            reports.setblocking(False)
            with contextlib.suppress(OSError, TimeoutError):  # the deadline, or the child gone without a word
                while data := await asyncio.wait_for(running.sock_recv(reports, _MAX_MESSAGE),
                                                     max(0.0, deadline - time.monotonic())):
                    self._apply(pickle.loads(data))
            reports.close()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("the DHCP responder process %d did not end within %.0f s: killed", proc.pid, _STOP_SECONDS)
                proc.kill()
                await proc.wait()

    # ---- what the child answers from -----------------------------------------------------------------

    def mirror_changed(self) -> None:
        """The policy's snapshot or the enabled flag changed: send the child the new one (coalesced)."""
        self._mirror_dirty = True
        if self._ctl is not None and self._loop is not None and (self._sender is None or self._sender.done()):
            self._sender = self._loop.create_task(self._send_mirror())

    def _poll_enabled(self) -> None:
        if self.enabled() != self._sent_enabled:
            self.mirror_changed()
        if self._loop is not None and not self._ending:
            self._poll = self._loop.call_later(_ENABLED_POLL_SECONDS, self._poll_enabled)

    async def _send_mirror(self) -> None:
        loop = asyncio.get_running_loop()
        while self._mirror_dirty and self._ctl is not None:
            self._mirror_dirty = False
            snapshot, enabled = self.mirror(), self.enabled()
            if snapshot is self._sent_snapshot and enabled == self._sent_enabled:
                continue
            # An unchanged snapshot is not sent again: a switch flip costs a few bytes, not the index.
            message = ("mirror", None if snapshot is self._sent_snapshot else snapshot, enabled)
            try:
                await loop.sock_sendall(self._ctl, _frame(message))
            except OSError as e:  # the child is gone: its successor gets the whole mirror at its start
                log.debug("mirror not sent to the DHCP responder process: %s", e)
                return
            self._sent_snapshot, self._sent_enabled = snapshot, enabled

    # ---- what the child reports -------------------------------------------------------------------------

    def _on_reports(self) -> None:
        reports = self._reports_in
        if reports is None:
            return
        for _ in range(_READ_BATCH):
            try:
                data = reports.recv(_MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._child_exited()
                return
            self._apply(pickle.loads(data))

    def _apply(self, message: tuple[Any, ...]) -> None:
        if message[0] == "report":
            self.dispatch(message[1], message[2])
        elif message[0] == "stats":
            stats: dict[str, Any] = message[1]
            stats["errors"] += self.report_errors  # the child's bugs and the parent's failed reports
            for name, value in stats.items():
                setattr(self.stats, name, value)

    def _child_exited(self) -> None:
        if self._ending or self._loop is None:
            return
        status = self._proc.returncode if self._proc is not None else None
        log.error("the DHCP responder process exited (status %s): starting another in %.0f s",
                  status, _RESPAWN_SECONDS)
        self.restarts += 1
        self._respawn = self._loop.create_task(self._start_again())

    async def _start_again(self) -> None:
        await self._end_child()
        while not self._ending:
            await asyncio.sleep(_RESPAWN_SECONDS)
            try:
                await self._spawn()
                return
            except Exception as e:
                await self._end_child()
                self._log.warning("respawn", "the DHCP responder process did not start again: %s", e)


def _set_buffer(sock: socket.socket, force: int, plain: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, _REPORT_BUFFER)
    except OSError:  # unprivileged: capped at net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, plain, _REPORT_BUFFER)


def _frame(message: tuple[object, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


# ---- the child ----------------------------------------------------------------------------------------


class _Mirror:
    """The child's BootPolicy: `boot_spec` from the parent's snapshot. What it learns goes to the parent
    as a Report, so the telling methods are never called here."""

    def __init__(self, snapshot: SpecSource) -> None:
        self.snapshot = snapshot

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        return self.snapshot.boot_spec(uuid=uuid, mac=mac)

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        raise AssertionError("reported to the parent")

    def client_unknown(self, client: PxeClient) -> None:
        raise AssertionError("reported to the parent")

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        raise AssertionError("the child serves no files")


class _ChildResponder(ProxyDHCP):
    """The responder as the child runs it: reports go to the parent, before the reply is sent."""

    def __init__(self, settings: ChildSettings, snapshot: SpecSource, enabled: bool, out: socket.socket) -> None:
        super().__init__(_Mirror(snapshot), settings.advertise, port=settings.port, reply_port=settings.reply_port,
                         interface=settings.interface, broadcast=settings.broadcast, pxe_config=settings.pxe_config,
                         events=_no_sink if settings.events else None, enabled=self._is_enabled, own_thread=True)
        self.on = enabled
        self._out = out
        self._last_stats: dict[str, object] = {}

    def _is_enabled(self) -> bool:
        return self.on

    def _report(self, what: Report, *args: object) -> None:
        try:
            self._out.send(pickle.dumps(("report", what, args), protocol=pickle.HIGHEST_PROTOCOL),
                           socket.MSG_DONTWAIT)
        except BlockingIOError:  # the parent has not read the last few MiB: never wait for it
            self.stats.reports_dropped += 1
        except OSError:  # the parent is gone: the control socket's EOF ends this process
            pass

    def send_stats(self, *, wait: bool = False) -> None:
        current = dict(vars(self.stats))
        if current == self._last_stats:
            return
        with contextlib.suppress(OSError):
            self._out.send(pickle.dumps(("stats", current)), 0 if wait else socket.MSG_DONTWAIT)
            self._last_stats = current


def _no_sink(kind: str, data: object) -> None:  # the child's events go to the parent as Report.BOOT
    raise AssertionError("reported to the parent")


def _read_frame(sock: socket.socket) -> tuple[Any, ...] | None:
    """One whole control frame (blocking), or None at EOF."""
    header = _read_exactly(sock, _FRAME.size)
    if header is None:
        return None
    body = _read_exactly(sock, _FRAME.unpack(header)[0])
    return None if body is None else tuple(pickle.loads(body))


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def child_main(ctl: socket.socket, out: socket.socket) -> int:
    """Serve the sockets the settings name until the control socket reaches EOF."""
    # A terminal's Ctrl-C and a service manager's SIGTERM reach the whole group: they are the parent's to
    # act on (its stop() ends this process), not a death here that the parent would take for a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    first, mirror = _read_frame(ctl), _read_frame(ctl)
    if first is None or mirror is None:
        return 0  # the parent went away before it said anything
    settings: ChildSettings = first[1]
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (responder process): %(message)s")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, settings.nice)
    except OSError:  # not allowed to raise it: the parent's niceness, as any child's
        log.debug("responder process: niceness %d not allowed", settings.nice)
    responder = _ChildResponder(settings, mirror[1], mirror[2], out)
    try:
        raw = None
        if settings.dhcp_fd < 0:
            raw = RawListener(settings.interface, settings.advertise, settings.port, settings.reply_port,
                              responder._on_raw, responder.stats)
            raw.open()
        dhcp_sock = None if raw is not None else socket.socket(fileno=settings.dhcp_fd)
        responder.serve_sockets(dhcp_sock, socket.socket(fileno=settings.pxe_fd), raw)
    except Exception as e:  # scapy raises several types for a missing interface or capability
        out.send(pickle.dumps(("failed", f"{type(e).__name__}: {e}")))
        return 1
    out.send(pickle.dumps(("ready", raw.interface if raw is not None else "")))
    _freeze()
    while True:
        readable, _, _ = select.select([ctl], [], [], _STATS_SECONDS)
        if not readable:
            responder.send_stats()
            continue
        message = _read_frame(ctl)
        if message is None:
            break
        if message[1] is not None:
            responder.policy = _Mirror(message[1])
            _freeze()
        responder.on = message[2]
    # No responder.stop(): it would shutdown() the sockets to wake its threads, and a socket's shutdown
    # is the socket's, not this process's descriptor's: the parent keeps them for the next child (a
    # respawn). The threads are daemons, blocked in a receive; they end with this process.
    responder.on = False
    responder.send_stats(wait=True)
    return 0


def _freeze() -> None:
    """The snapshot lives until the next one: out of the collector's generations, so that no full
    collection over it pauses a reply (the one before it is freed as its references go)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def main(argv: list[str]) -> int:
    ctl, out = (socket.socket(fileno=int(fd)) for fd in argv)
    code = child_main(ctl, out)
    # Out at once, without the interpreter's teardown (its daemon threads, scapy's modules): until this
    # process is gone it holds the DHCP ports, and an appliance restarted after a crash binds them next.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # `python -m dhcp.process`: run as the module, so that pickles name one class
    from dhcp.process import main as _main

    sys.exit(_main(sys.argv[1:]))


__all__ = ["Address", "ChildSettings", "ProcessProxyDHCP", "SpecSource", "Stats"]
