"""Durations measured from the event stream, for /metrics: how long workflows take, and how long a node
takes from power-on to its root disk.

`Timings.observe` sees every event as it is published (EventBus observers: synchronous, cheap, on the
loop). A workflow's duration is from its first step event to its `done` or `failed` step, per server and
workflow (create: recorded → done; delete and root swaps: unexport → done). Power-on → root comes from the
`root` event a reboot with a BMC publishes once its node has logged in to its target (domain/lifecycle.py:
polled, so to within its poll interval). The last DHCP reply each server got is kept for the alert on a
node that PXE-boots but never reaches its root.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from domain.events import Event

WORKFLOW_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
ROOT_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
ENDS = ("done", "failed")
K = TypeVar("K")
TRACKED = 10_000  # workflows in flight / servers remembered; the oldest are forgotten beyond it


@dataclass
class Histogram:
    """A Prometheus histogram's state: per-bucket counts (not cumulative), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, le in enumerate(self.bounds):
            if value <= le:
                self.counts[i] += 1
                return

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for le, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class Timings:
    def __init__(self) -> None:
        self.workflows: dict[tuple[str, str], Histogram] = {}  # (workflow, outcome) -> durations
        self.power_on_to_root = Histogram(ROOT_BUCKETS)
        self.last_dhcp_reply: OrderedDict[str, float] = OrderedDict()  # server -> wall-clock time
        self._started: OrderedDict[tuple[str, str], float] = OrderedDict()  # (server, workflow) -> first step

    def observe(self, event: Event) -> None:
        data = event.data
        server = data.get("server")
        if event.kind == "workflow" and isinstance(server, str):
            self._workflow(server, str(data.get("workflow", "")), str(data.get("step", "")), event.at)
        elif event.kind == "dhcp" and isinstance(server, str):
            _remember(self.last_dhcp_reply, server, event.at)
        elif event.kind == "root":
            seconds = data.get("after_power_on_seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
                self.power_on_to_root.observe(float(seconds))

    def _workflow(self, server: str, workflow: str, step: str, at: float) -> None:
        key = (server, workflow)
        if step not in ENDS:
            if key not in self._started:
                _remember(self._started, key, at)
            return
        started = self._started.pop(key, None)
        if started is None:  # a one-step workflow (add-volume, snapshot), or one begun before this process
            return
        outcome = "ok" if step == "done" else "failed"
        hist = self.workflows.setdefault((workflow, outcome), Histogram(WORKFLOW_BUCKETS))
        hist.observe(max(0.0, at - started))


def _remember(table: OrderedDict[K, float], key: K, at: float) -> None:
    table[key] = at
    table.move_to_end(key)
    while len(table) > TRACKED:
        table.popitem(last=False)
