"""How many iSCSI sessions each exported target holds, for /metrics: one read of the export driver per
refresh, whatever the number of targets, and a reading reused for a few seconds (several Prometheus
servers scraping, a dashboard polling) — a scrape never costs a `tgtadm` show or a `ctladm islist` per
target. Callers that ask while a read runs share it.

And how many iSCSI logins the target refused, where that can be known: the supervised tgtd writes each
failed CHAP authentication to its log in the state dir (`CHAP initiator auth.: authentication of <iqn>
failed`); the log is read on from where the last read stopped, off the loop. ctld, a system tgtd and the
tests' stand-ins keep no such log here: no figure (None), rather than a zero that would look like one.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from iscsi.exports import ExportManager
from iscsi.model import SessionCensus
from iscsi.tgt import TgtDriver

FRESH = 5.0  # seconds a reading answers further asks
LOG_READ_MAX = 4 << 20  # bytes of new log read per scrape at most (the rest at the next ones)


class SessionCounts:
    def __init__(self, exports: ExportManager, clock: Callable[[], float] = time.monotonic,
                 fresh: float = FRESH) -> None:
        self._exports = exports
        self._clock = clock
        self.fresh = fresh
        self._task: asyncio.Task[dict[str, int]] | None = None
        self._at = 0.0
        self.reads = 0  # driver reads so far (tests: one per refresh)
        self.logins = LoginFailures(exports)

    async def per_target(self) -> dict[str, int]:
        """Exported target IQN -> sessions now (StorageError when the driver cannot say)."""
        now = self._clock()
        task = self._task
        if task is None or (task.done() and now - self._at > self.fresh):
            self._at = now
            task = self._task = asyncio.get_running_loop().create_task(self._read())
        return await asyncio.shield(task)

    async def _read(self) -> dict[str, int]:
        last = self._exports.last_state
        targets = sorted(last.targets) if last is not None else []
        if not targets:
            return {}
        self.reads += 1
        driver = self._exports.driver
        if isinstance(driver, SessionCensus):
            found = await driver.all_sessions()
            return {iqn: len(found.get(iqn, [])) for iqn in targets}
        # a driver without a census (tests' stand-ins): one ask per target, all at once
        counts = await asyncio.gather(*(driver.sessions(iqn) for iqn in targets))
        return {iqn: len(held) for iqn, held in zip(targets, counts, strict=True)}


# tgtd's words for a refused CHAP login (its iscsi/chap.c). It writes them without a newline, so the log
# is read as a stream: a match split across two reads is found once the rest arrives.
LOGIN_FAILED = re.compile(r"authentication of \S+ failed")
CARRY = 512  # bytes kept from a read for a match it may have cut (an IQN is at most 223)


class LoginFailures:
    def __init__(self, exports: ExportManager) -> None:
        self._exports = exports
        self._lock = asyncio.Lock()
        self._path: Path | None = None
        self._offset = 0
        self._carry = ""
        self.count = 0

    def log_path(self) -> Path | None:
        driver = self._exports.driver
        if isinstance(driver, TgtDriver) and driver.manage_daemon:
            return driver.daemon.log_path
        return None

    async def total(self) -> int | None:
        """Refused logins in the supervised tgtd's log so far; None where no such log is kept."""
        path = self.log_path()
        if path is None:
            return None
        async with self._lock:
            await asyncio.to_thread(self._read_on, path)
        return self.count

    def _read_on(self, path: Path) -> None:
        """Blocking: count the failures in what was added to the log since the last read."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        if path != self._path or size < self._offset:  # another log, or a new one in its place
            self._path, self._offset, self._carry, self.count = path, 0, "", 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(LOG_READ_MAX)
        self._offset += len(chunk)
        text = self._carry + chunk.decode("utf-8", "replace")
        end = 0
        for match in LOGIN_FAILED.finditer(text):
            self.count += 1
            end = match.end()
        self._carry = text[max(end, len(text) - CARRY):]
