"""What the TFTP server does with a request: a pure decision, apart from the sockets that carry it out.

`decide()` takes the decoded packet from the listening port and what the server knows at that moment (is
the service on, is a transfer for this client and file in flight, how many run, the bound) and answers
Serve, Refuse (a TFTP ERROR, RFC 1350 §5) or Ignore (no answer). The checks run in this order:

1. a write request → refused, error 2, answered from the listening port (the server is read-only);
2. DATA / ACK / ERROR on the request port → ignored, no transfer to answer for;
3. service disabled → ignored (the client tries again, or another server answers);
4. the same client and file in flight → ignored: a retransmitted RRQ, and the running transfer
   retransmits on its own timer; unless that transfer is already over (a UEFI tsize probe answered with
   ERROR 8 just before an RRQ from the same port), then it is a new request;
5. the transfer bound reached → ignored: the client re-sends its RRQ later, which is the back-pressure
   wanted;
6. a mode other than octet or netascii → refused, error 4;
7. otherwise served: the name is opened in the tree, and `refuse_open()` / `refuse_netascii()` are the
   refusals that only the opened name can tell.

Every refusal and every ignored request but the stray packets and the retransmissions names the outcome
of its "tftp" event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from bootfiles import tftp_packet as tp
from bootfiles.tree import Denied, TreeError

MODES = ("octet", "netascii")  # RFC 1350 §1; "mail" is obsolete and refused


class InFlight(Enum):
    """The server's transfer for the request's (client, file), if any."""

    NONE = "none"
    RUNNING = "running"
    FINISHED = "finished"  # over, but its task has not cleaned up yet


@dataclass(frozen=True, slots=True)
class Serve:
    request: tp.ReadRequest
    replaces: bool = False  # the finished transfer of this (client, file) is to be forgotten first


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer with ERROR `code`/`message`, from the listening port or from a fresh one (a new TID, as a
    transfer would use: what clients expect for an RRQ)."""

    code: int
    message: str
    outcome: str
    from_listener: bool = False
    server: str | None = None  # the server whose file was refused, where the tree named it
    denied: Denied | None = None  # a boot config asked for from an address not its node's


@dataclass(frozen=True, slots=True)
class Ignore:
    """No answer at all; `outcome` None means no event either (stray packets, retransmitted RRQs)."""

    outcome: str | None
    reason: str
    level: int = logging.DEBUG


Decision = Serve | Refuse | Ignore


def decide(
    packet: tp.Packet, *, enabled: bool, in_flight: InFlight, active: int, max_transfers: int
) -> Decision:
    """The decision for one decoded packet that arrived on the listening port (see the module doc)."""
    if isinstance(packet, tp.WriteRequest):
        return Refuse(tp.ErrorCode.ACCESS_VIOLATION, "read-only server", "refused-write", from_listener=True)
    if not isinstance(packet, tp.ReadRequest):
        return Ignore(None, f"stray {type(packet).__name__} on the request port")
    if not enabled:
        return Ignore("disabled", "service disabled")
    if in_flight is InFlight.RUNNING:
        return Ignore(None, "retransmitted RRQ: its transfer is running")
    running = active - (in_flight is InFlight.FINISHED)  # a transfer that is over holds no place
    if running >= max_transfers:
        return Ignore("busy", f"{running} transfers running, dropping RRQ", logging.WARNING)
    if packet.mode not in MODES:
        return Refuse(tp.ErrorCode.ILLEGAL_OPERATION, f"mode {packet.mode} refused", "bad-mode")
    return Serve(packet, replaces=in_flight is InFlight.FINISHED)


def refuse_open(exc: TreeError) -> Refuse:
    """The answer to a name the tree would not open: its TFTP code, a short text, its outcome."""
    if isinstance(exc, Denied):
        return Refuse(exc.code, exc.reply_text(), exc.outcome, server=exc.server_uuid, denied=exc)
    return Refuse(exc.code, exc.reply_text(), exc.outcome)


def refuse_netascii(mode: str, in_memory: bool) -> Refuse | None:
    """netascii is converted in memory: a file served from disk (too large to cache) cannot be."""
    if mode == "netascii" and not in_memory:
        return Refuse(tp.ErrorCode.NOT_DEFINED, "netascii not available here", "bad-mode")
    return None
