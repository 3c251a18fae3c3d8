"""The appliance's event stream: boot events (DHCP, TFTP, HTTP), export changes and workflow steps.

`publish` is synchronous and cheap so the DHCP and TFTP paths can call it from their datagram
handlers; persisting to SQLite happens in batches on the store's thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from domain.errors import StoreUnreachable
from domain.periodic import Periodic
from domain.store import AsyncStore

log = logging.getLogger("cello.events")


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str
    data: Mapping[str, object] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "at": round(self.at, 6), "kind": self.kind, **self.data}


class EventBus:
    SUBSCRIBER_QUEUE = 1000
    RECENT = 1000

    def __init__(self, store: AsyncStore | None = None, appliance: str = "") -> None:
        self._store = store
        self.appliance = appliance  # its stored events are numbered apart from a fleet's other appliances'
        self._last_id = 0
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._recent: deque[Event] = deque(maxlen=self.RECENT)
        self._unsaved: list[Event] = []
        # Kept for the store only from start() on: an appliance started without its store (its database
        # out of reach) streams events live, but piles none up, and saves none under ids not yet read.
        self._saving = False
        self._flusher = Periodic(self.flush, 0.5, "cello-events-flush")
        self.counts: Counter[str] = Counter()  # for /metrics
        # Called with every event as it is published (domain/timings.py): synchronous and cheap.
        self.observers: list[Callable[[Event], None]] = []

    def publish(self, kind: str, data: Mapping[str, object]) -> Event:
        self._last_id += 1
        event = Event(self._last_id, time.time(), kind, dict(data))
        self.counts[kind] += 1
        self._recent.append(event)
        for observe in self.observers:
            try:
                observe(event)
            except Exception:
                log.exception("event observer failed on %s", kind)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A reader that does not keep up is cut off rather than slowing boots down.
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
        if self._saving:
            self._unsaved.append(event)
        return event

    def recent(self, since: int = 0) -> list[Event]:
        return [e for e in self._recent if e.id > since]

    async def subscribe(self, since: int | None = None) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(self.SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            if since is not None:
                for old in self.recent(since):
                    yield old
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)

    async def start(self) -> None:
        if self._store is not None:
            # Ids go on from the stored ones: a reader resuming with `since` (Last-Event-ID) after a restart
            # of the appliance must not see the new events' ids start again below the one it has.
            self._last_id = max(self._last_id, await self._store.call(self._store.sync.last_event_id, self.appliance))
            self._saving = True
            self._flusher.start()

    async def stop(self) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
        await self._flusher.stop()

    async def flush(self) -> None:
        if self._store is None or not self._unsaved:
            return
        batch, self._unsaved = self._unsaved, []
        rows = [(e.id, e.at, e.kind, _server_of(e), dict(e.data)) for e in batch]
        try:
            await self._store.call(self._store.sync.add_events, rows, self.appliance)
        except StoreUnreachable as e:  # an outage: said in one line, not a traceback every half second
            log.warning("could not save %d events: %s", len(rows), e)
        except Exception:
            log.exception("could not save %d events", len(rows))


def _server_of(event: Event) -> str | None:
    server = event.data.get("server")
    return server if isinstance(server, str) else None
