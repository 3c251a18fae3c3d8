"""Placement: which appliance gets a new server, the way Cinder's and Nova's filter schedulers decide.

Filters drop the appliances that cannot take the request, each saying why; weighers rank the rest. A
weigher's raw values are normalised to 0..1 over the appliances that passed (all equal → 0), so a
weigher counting bytes and one counting servers weigh alike until their multipliers say otherwise. The
highest sum wins; a tie goes to the first name, so the same inputs always give the same answer.

Pure: the caller gathers the candidates (heartbeats, the store's provisioned sizes) and turns a
placement with nothing chosen into its 409/503; `Placement.explain()` is the sentence it shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

GiB = 1 << 30


@dataclass(frozen=True)
class Candidate:
    name: str
    up: bool  # its heartbeat is fresh
    disabled: bool
    disabled_reason: str
    labels: Mapping[str, str]
    capacity_bytes: int
    placed_bytes: int  # provisioned by the servers it holds, not what their sparse clones use
    servers: int
    templates: frozenset[str]  # "template@version" of which it holds a READY copy

    def __post_init__(self) -> None:
        # A frozen dataclass holding the caller's dict would still change under it.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True)
class PlacementRequest:
    template: str
    version: str
    os_bytes: int  # the OS clone's virtual size
    data_bytes: int  # the data volumes asked for, summed
    labels: Mapping[str, str]  # what the appliance must carry, e.g. {"rack": "3"}
    anti_affinity: frozenset[str] = frozenset()  # appliance names to avoid (where the group already is)
    pin: str = ""  # only this appliance is considered; it must still pass every other filter

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def template_version(self) -> str:
        return f"{self.template}@{self.version}"

    @property
    def needed_bytes(self) -> int:
        return self.os_bytes + self.data_bytes


class Filter(Protocol):
    @property
    def name(self) -> str: ...

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        """Why `c` cannot take `r`, or None when it can."""


class Weigher(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def multiplier(self) -> float: ...

    def raw(self, c: Candidate, r: PlacementRequest) -> float:
        """Higher is better; only its place between the other candidates' values counts."""


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def free_bytes(c: Candidate, overcommit: float) -> int:
    # Clones are sparse, but the data volumes are promised, so the default overcommit is 1.0:
    # the provisioned sizes, not the bytes used, are what must fit.
    return int(c.capacity_bytes * overcommit) - c.placed_bytes


def _check_overcommit(overcommit: float) -> None:
    if not (math.isfinite(overcommit) and overcommit > 0):
        raise ValueError(f"overcommit must be a positive number, not {overcommit!r}")


@dataclass(frozen=True)
class Pin:
    name = "pin"

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        return f"the request is pinned to {r.pin}" if r.pin and c.name != r.pin else None


@dataclass(frozen=True)
class UpEnabled:
    name = "up_enabled"

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        if not c.up:
            return "down: no heartbeat"
        if c.disabled:
            return f"disabled: {c.disabled_reason or 'no reason given'}"
        return None


@dataclass(frozen=True)
class TemplateVersion:
    name = "template_version"

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        # Cloning needs the local snapshot; a copy still arriving cannot be cloned yet.
        return None if r.template_version in c.templates else f"does not hold {r.template_version} (no ready copy)"


@dataclass(frozen=True)
class Capacity:
    overcommit: float = 1.0
    name = "capacity"

    def __post_init__(self) -> None:
        _check_overcommit(self.overcommit)

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        free = free_bytes(c, self.overcommit)
        if r.needed_bytes <= free:
            return None
        # Lowering the overcommit can leave an appliance holding more than it may: say none is free.
        return f"needs {gib(r.needed_bytes)}, {gib(max(free, 0))} free"


@dataclass(frozen=True)
class Labels:
    name = "labels"

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        for key, wanted in sorted(r.labels.items()):
            has = c.labels.get(key)
            if has != wanted:
                return f"label {key}={wanted} wanted, " + (f"has {key}={has}" if has is not None else f"has no {key}")
        return None


@dataclass(frozen=True)
class AntiAffinity:
    name = "anti_affinity"

    def reason(self, c: Candidate, r: PlacementRequest) -> str | None:
        return "the request avoids it (its group is already there)" if c.name in r.anti_affinity else None


@dataclass(frozen=True)
class FreeCapacity:
    multiplier: float = 1.0
    overcommit: float = 1.0
    name = "free_capacity"

    def __post_init__(self) -> None:
        _check_multiplier(self.name, self.multiplier)
        _check_overcommit(self.overcommit)

    def raw(self, c: Candidate, r: PlacementRequest) -> float:
        # After placement, so a request that fills an appliance counts against it.
        return float(free_bytes(c, self.overcommit) - r.needed_bytes)


@dataclass(frozen=True)
class FewestServers:
    multiplier: float = 1.0
    name = "fewest_servers"

    def __post_init__(self) -> None:
        _check_multiplier(self.name, self.multiplier)

    def raw(self, c: Candidate, r: PlacementRequest) -> float:
        return float(-c.servers)


def _check_multiplier(name: str, multiplier: float) -> None:
    # Negative is allowed (stack instead of spread, as in Nova); NaN or infinity would poison every sum.
    if not math.isfinite(multiplier):
        raise ValueError(f"weigher {name}: multiplier must be a finite number, not {multiplier!r}")


DEFAULT_FILTERS: tuple[Filter, ...] = (Pin(), UpEnabled(), TemplateVersion(), Capacity(), Labels(), AntiAffinity())
DEFAULT_WEIGHERS: tuple[Weigher, ...] = (FreeCapacity(1.0), FewestServers(0.5))

# Config names its filters and weighers by these strings, so a table from name to class is the point here.
FILTERS: Mapping[str, type[Pin | UpEnabled | TemplateVersion | Capacity | Labels | AntiAffinity]] = {
    f.name: f for f in (Pin, UpEnabled, TemplateVersion, Capacity, Labels, AntiAffinity)}
WEIGHERS: Mapping[str, type[FreeCapacity | FewestServers]] = {w.name: w for w in (FreeCapacity, FewestServers)}


def _unknown(what: str, name: str, known: Mapping[str, object]) -> ValueError:
    return ValueError(f"unknown placement {what} {name!r}; known: {', '.join(sorted(known))}")


def filters_from_names(names: Sequence[str], *, overcommit: float = 1.0) -> list[Filter]:
    """The filters config names, in its order (the first to reject a candidate is the reason given)."""
    out: list[Filter] = []
    for n in names:
        if n not in FILTERS:
            raise _unknown("filter", n, FILTERS)
        out.append(Capacity(overcommit) if n == Capacity.name else FILTERS[n]())
    return out


def weighers_from_names(multipliers: Mapping[str, float], *, overcommit: float = 1.0) -> list[Weigher]:
    """`{"free_capacity": 1.0, "fewest_servers": 0.5}` → the weighers with those multipliers."""
    out: list[Weigher] = []
    for n, m in multipliers.items():
        if n == FreeCapacity.name:
            out.append(FreeCapacity(m, overcommit))
        elif n == FewestServers.name:
            out.append(FewestServers(m))
        else:
            raise _unknown("weigher", n, WEIGHERS)
    return out


def normalise(values: Sequence[float]) -> list[float]:
    """Each value's place between the lowest (0.0) and the highest (1.0); all equal → all 0.0."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


@dataclass(frozen=True)
class Placement:
    chosen: str | None
    weights: dict[str, float] = field(default_factory=dict)  # the candidates that passed
    rejected: dict[str, str] = field(default_factory=dict)  # name -> "<filter>: <why>"

    def explain(self) -> str:
        why = "; ".join(f"{n}: {self.rejected[n]}" for n in sorted(self.rejected))
        if self.chosen is not None:
            head = f"placed on {self.chosen} (weight {self.weights[self.chosen]:.2f})"
            return f"{head}; {why}" if why else head
        return f"not placed: {why}" if why else "not placed: no appliance to place on"

    def as_dict(self) -> dict[str, object]:
        return {"chosen": self.chosen, "weights": dict(self.weights), "rejected": dict(self.rejected),
                "explain": self.explain()}


class Scheduler:
    def __init__(self, filters: Sequence[Filter] = DEFAULT_FILTERS,
                 weighers: Sequence[Weigher] = DEFAULT_WEIGHERS) -> None:
        # Like Nova, a request's pin, labels or anti-affinity count only if the filter reading them is here.
        self.filters = tuple(filters)
        self.weighers = tuple(weighers)

    def rejection(self, c: Candidate, request: PlacementRequest) -> str | None:
        """`"<filter>: <why>"` from the first filter that rejects `c`, or None when all let it pass."""
        for f in self.filters:
            why = f.reason(c, request)
            if why is not None:
                return f"{f.name}: {why}"
        return None

    def place(self, candidates: Sequence[Candidate], request: PlacementRequest) -> Placement:
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"candidate names repeat: {', '.join(repeated)}")
        rejected: dict[str, str] = {}
        passed: list[Candidate] = []
        for c in candidates:
            why = self.rejection(c, request)
            if why is None:
                passed.append(c)
            else:
                rejected[c.name] = why
        if request.pin and request.pin not in names and any(isinstance(f, Pin) for f in self.filters):
            # Otherwise the answer would list only the others, each "pinned to x", and never say x is unknown.
            rejected[request.pin] = f"{Pin.name}: no appliance named {request.pin}"
        weights = {c.name: 0.0 for c in passed}
        for w in self.weighers:
            for c, v in zip(passed, normalise([w.raw(c, request) for c in passed]), strict=True):
                weights[c.name] += w.multiplier * v
        chosen = min(weights, key=lambda n: (-weights[n], n), default=None)
        return Placement(chosen, weights, rejected)
