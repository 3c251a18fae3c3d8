"""Record states and the moves between them, written as data (Cinder's lifecycle).

A server: creating → exporting → available; a failed create is compensated back through creating to
error; deleting → (gone) | error_deleting, and a retried delete starts again from either; available →
rebuilding → available while its root is swapped (on the new root, or back on the old one); available →
moving → available while its volumes go to another appliance (there, or back here when the move fails). The store
refuses any other move (`Store.set_server_state`), so a workflow bug shows up as an error, not as a
record in a state nothing expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class ServerState(StrEnum):
    CREATING = "creating"
    EXPORTING = "exporting"
    AVAILABLE = "available"
    ERROR = "error"
    DELETING = "deleting"
    ERROR_DELETING = "error_deleting"
    REBUILDING = "rebuilding"  # its root is being swapped (upgrade, rollback, snapshot restore): not exported
    MOVING = "moving"  # its volumes travel to another appliance of the fleet (its node is off): not exported


class VolumeState(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"
    DELETING = "deleting"


S = ServerState
SERVER_MOVES: Mapping[ServerState, frozenset[ServerState]] = {
    S.CREATING: frozenset({S.CREATING, S.EXPORTING, S.ERROR}),  # CREATING again: "failed, cleaning up"
    S.EXPORTING: frozenset({S.AVAILABLE, S.CREATING}),  # back to CREATING: the compensation starts
    S.AVAILABLE: frozenset({S.DELETING, S.REBUILDING, S.MOVING}),
    S.MOVING: frozenset({S.AVAILABLE}),  # on its new appliance, or back on its old one
    S.REBUILDING: frozenset({S.AVAILABLE, S.ERROR}),  # AVAILABLE on its new root, or on its old one again
    S.ERROR: frozenset({S.DELETING}),
    S.DELETING: frozenset({S.DELETING, S.ERROR_DELETING}),  # or the record goes; DELETING again: a retry
    S.ERROR_DELETING: frozenset({S.DELETING}),
}
# The target of a server in these states is part of the desired export configuration.
EXPORTED: frozenset[ServerState] = frozenset({S.EXPORTING, S.AVAILABLE})
# A create is under way (a delete must wait for its end).
BEING_MADE: frozenset[ServerState] = frozenset({S.CREATING, S.EXPORTING})
# Counted against a quota and holding a CTL port: every state but gone.
LIVE: frozenset[ServerState] = frozenset(S)


def may_move(old: str, new: str) -> bool:
    return ServerState(new) in SERVER_MOVES.get(ServerState(old), frozenset())
