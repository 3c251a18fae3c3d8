"""The appliance's own tgtd process: started so that it outlives Cello, and found again by the next Cello.

The data plane outlives the control plane. A tgtd started here runs in a session of its own (no signal
meant for Cello or its terminal reaches it), writes its log to a file (a pipe to Cello would break when
Cello dies, and tgtd's next log line would take a SIGPIPE), and is recorded in
`<state_dir>/tgtd-<control port>.json` with its pid and its kernel start time. A later Cello adopts it
when that pid is still the same process (same start time, not a zombie) and its control port answers.
Only an explicit teardown stops it.

Exits are watched through a pidfd, so a tgtd that is not our child (an adopted one) is watched the same
way as one we started. Linux only, like tgt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iscsi.model import StorageError

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 4096


@dataclass(frozen=True)
class TgtdRecord:
    """What the state file says of the tgtd a Cello started."""

    pid: int
    started: int  # field 22 of /proc/<pid>/stat: a pid reused by another process has another one
    # CHAP user -> sha256 of the secret the driver set: tgt never shows secrets, so without this an
    # adopting driver would have to remake (and rebind) every account.
    secrets: dict[str, str] = field(default_factory=dict)


def process_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time of a live process, or None if there is none (or only its zombie)."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def read_record(path: Path) -> TgtdRecord | None:
    try:
        raw = json.loads(path.read_text())
        secrets = raw.get("secrets", {})
        if not isinstance(secrets, dict):
            return None
        return TgtdRecord(int(raw["pid"]), int(raw["started"]), {str(k): str(v) for k, v in secrets.items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(path: Path, record: TgtdRecord) -> None:
    """Atomically (temp file, fsync, rename): a crash mid-write must not lose the tgtd it names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"pid": record.pid, "started": record.started, "secrets": record.secrets}, sort_keys=True)
    # 0600: it holds hashes of the CHAP secrets
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TgtdProcess:
    """One tgtd on one control port: spawn, adopt, watch, terminate. `ready()` asks tgtd's control port."""

    def __init__(self, argv: Sequence[str], control_port: int, state_dir: Path,
                 ready: Callable[[], Awaitable[bool]], *, start_timeout: float = 10.0) -> None:
        self.argv = list(argv)
        self.control_port = control_port
        self.state_dir = state_dir
        self._ready = ready
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self.adopted = False
        self.generation = 0  # bumped at every spawn or adoption: what a cached reading belongs to
        self.secrets: dict[str, str] = {}
        self._started = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[int | None] | None = None
        self._pidfd: int | None = None

    @property
    def record_path(self) -> Path:
        return self.state_dir / f"tgtd-{self.control_port}.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"tgtd-{self.control_port}.log"

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(line for line in text.splitlines()[-lines:] if line.strip())

    # -- finding the one an earlier Cello started --------------------------------------------------------

    async def adopt(self) -> bool:
        """Take over the tgtd the state file names, if it is still that process and it answers."""
        record = await asyncio.to_thread(read_record, self.record_path)
        if record is None or await asyncio.to_thread(process_start_time, record.pid) != record.started:
            return False
        if not await self._ready():
            return False
        self._watch(record.pid, None, record.started)
        self.adopted = True
        self.secrets = dict(record.secrets)
        return True

    # -- starting a new one -----------------------------------------------------------------------------

    async def spawn(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            popen = await asyncio.to_thread(self._popen_detached)
        except FileNotFoundError:
            raise StorageError(f"{self.argv[0]}: command not found (install tgt)") from None
        started = await asyncio.to_thread(process_start_time, popen.pid) or 0
        self._watch(popen.pid, popen, started)
        self.adopted = False
        self.secrets = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        assert self._exited is not None
        while True:
            if self._exited.done():
                raise StorageError(f"tgtd -C {self.control_port} exited with {self._exited.result()} at start: "
                                   + self.log_tail())
            if await self._ready() and not self._exited.done():
                break
            if loop.time() > deadline:
                await self.terminate()
                raise StorageError(f"tgtd -C {self.control_port}: control socket not ready after "
                                   f"{self.start_timeout:g}s: " + self.log_tail())
            await asyncio.sleep(0.05)
        await self.save()

    def _popen_detached(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as logfile:
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                    start_new_session=True, close_fds=True)

    async def save(self) -> None:
        if self.pid is not None:
            await asyncio.to_thread(write_record, self.record_path,
                                    TgtdRecord(self.pid, self._started, dict(self.secrets)))

    # -- watching ---------------------------------------------------------------------------------------

    def _watch(self, pid: int, popen: subprocess.Popen[bytes] | None, started: int) -> None:
        self.release()
        loop = asyncio.get_running_loop()
        self.pid, self._popen, self._started = pid, popen, started
        self.generation += 1
        exited: asyncio.Future[int | None] = loop.create_future()
        self._exited = exited
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            exited.set_result(self._reap())
            return
        self._pidfd = fd

        def on_exit() -> None:
            loop.remove_reader(fd)
            if not exited.done():
                exited.set_result(self._reap())

        loop.add_reader(fd, on_exit)

    def _reap(self) -> int | None:
        """The exit status of a child of ours (reaped); None for an adopted tgtd (its parent reaps it)."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None

    async def wait(self) -> int | None:
        """Until this tgtd exits; its exit status when it was our child."""
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    def release(self) -> None:
        """Stop watching (Cello stops); the tgtd itself keeps running."""
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()

    async def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL; waits for the exit. tgtd ignores SIGTERM while it has targets."""
        if not self.running or self.pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), grace)
                return

    async def forget(self) -> None:
        """The state file goes: the tgtd it named was torn down on purpose."""
        self.release()
        self.pid = None
        await asyncio.to_thread(self.record_path.unlink, missing_ok=True)
