"""The audit log: who changed what through the API, and how it ended.

`record` is synchronous and cheap (the web middleware calls it once per write); rows go to the store in
batches on its thread, as domain/events.py does with events, never on the loop. What is recorded is the
caller, the method, the path, the status and a short detail the web layer chose — never a request body,
so no password, CHAP secret or BMC credential can reach the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from domain.errors import StoreUnreachable
from domain.periodic import Periodic
from domain.store import AsyncStore

log = logging.getLogger("cello.audit")

MAX_DETAIL = 200
MAX_PATH = 512
MAX_LIMIT = 1000


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    who: str
    method: str
    path: str
    status: int
    detail: str

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "at": round(self.at, 6), "who": self.who, "method": self.method, "path": self.path,
                "status": self.status, "detail": self.detail}


class AuditLog:
    FLUSH_EVERY = 0.5  # seconds

    def __init__(self, store: AsyncStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._unsaved: list[tuple[float, str, str, str, int, str]] = []
        self._flusher = Periodic(self.flush, self.FLUSH_EVERY, "cello-audit-flush")
        self.dropped = 0  # rows a failed write lost (logged; /metrics could show it)

    def record(self, who: str, method: str, path: str, status: int, detail: str = "") -> None:
        self._unsaved.append((self._clock(), who[:64], method[:16], path[:MAX_PATH], status, detail[:MAX_DETAIL]))

    async def list(self, since: int | None = None, limit: int = 100) -> list[AuditEntry]:
        """Oldest first: after id `since`, or the newest `limit` entries; what is still queued is saved first."""
        await self.flush()
        rows = await self._store.call(self._store.sync.audit, since, max(1, min(limit, MAX_LIMIT)))
        return [AuditEntry(*row) for row in rows]

    async def start(self) -> None:
        self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    async def flush(self) -> None:
        if not self._unsaved:
            return
        batch, self._unsaved = self._unsaved, []
        try:
            await self._store.call(self._store.sync.add_audit, batch)
        except Exception as e:
            self.dropped += len(batch)
            if isinstance(e, StoreUnreachable):  # an outage: one line, not a traceback each flush
                log.warning("could not save %d audit entries: %s", len(batch), e)
            else:
                log.exception("could not save %d audit entries", len(batch))
