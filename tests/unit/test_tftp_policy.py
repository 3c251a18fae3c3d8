"""The TFTP request decision (bootfiles.tftp_policy): every branch, as a pure function."""

from __future__ import annotations

import logging

import pytest

from bootfiles import tftp_packet as tp
from bootfiles.tftp_policy import Ignore, InFlight, Refuse, Serve, decide, refuse_netascii, refuse_open
from bootfiles.tree import Denied, NotFound, Refused, RenderFailed

RRQ = tp.ReadRequest("pxelinux.0", "octet", {"blksize": "1468"})


def on(packet: tp.Packet, *, enabled: bool = True, in_flight: InFlight = InFlight.NONE, active: int = 0,
       max_transfers: int = 4) -> object:
    return decide(packet, enabled=enabled, in_flight=in_flight, active=active, max_transfers=max_transfers)


def test_a_read_request_is_served() -> None:
    assert on(RRQ) == Serve(RRQ, replaces=False)
    netascii = tp.ReadRequest("notes.txt", "netascii")
    assert on(netascii) == Serve(netascii)


def test_a_write_request_is_refused_from_the_listening_port() -> None:
    # refused even when the service is off or busy: a read-only server says so to anyone
    for kw in ({}, {"enabled": False}, {"active": 4}):
        assert on(tp.WriteRequest("new.bin", "octet"), **kw) == Refuse(  # type: ignore[arg-type]
            tp.ErrorCode.ACCESS_VIOLATION, "read-only server", "refused-write", from_listener=True)


@pytest.mark.parametrize("packet", [tp.Data(1, b"x"), tp.Ack(1), tp.Error(8, "abort"), tp.OptionAck({"tsize": "1"})])
def test_stray_packets_on_the_request_port_are_ignored_without_an_event(packet: tp.Packet) -> None:
    decision = on(packet)
    assert isinstance(decision, Ignore) and decision.outcome is None and decision.level == logging.DEBUG


def test_disabled_is_ignored_with_an_event() -> None:
    decision = on(RRQ, enabled=False)
    assert isinstance(decision, Ignore) and decision.outcome == "disabled"


def test_a_retransmitted_rrq_is_ignored_without_an_event() -> None:
    decision = on(RRQ, in_flight=InFlight.RUNNING, active=1)
    assert isinstance(decision, Ignore) and decision.outcome is None


def test_an_rrq_after_a_finished_transfer_of_the_same_key_is_a_new_request() -> None:
    """EDK2's tsize probe answered with ERROR 8, then an RRQ from the same port at once."""
    assert on(RRQ, in_flight=InFlight.FINISHED, active=1) == Serve(RRQ, replaces=True)
    # the finished transfer holds no place in the bound
    assert on(RRQ, in_flight=InFlight.FINISHED, active=4, max_transfers=4) == Serve(RRQ, replaces=True)


def test_the_transfer_bound_drops_the_rrq_with_a_warning_and_a_busy_event() -> None:
    assert on(RRQ, active=3, max_transfers=4) == Serve(RRQ)
    decision = on(RRQ, active=4, max_transfers=4)
    assert isinstance(decision, Ignore) and decision.outcome == "busy" and decision.level == logging.WARNING
    assert "4 transfers running" in decision.reason


def test_mail_mode_is_refused_from_a_fresh_port() -> None:
    assert on(tp.ReadRequest("pxelinux.0", "mail")) == Refuse(
        tp.ErrorCode.ILLEGAL_OPERATION, "mode mail refused", "bad-mode", from_listener=False)


def test_checks_run_in_order_disabled_before_busy_before_mode() -> None:
    mail = tp.ReadRequest("pxelinux.0", "mail")
    assert on(mail, enabled=False, active=9).outcome == "disabled"  # type: ignore[attr-defined]
    assert on(mail, active=9).outcome == "busy"  # type: ignore[attr-defined]
    assert on(mail, in_flight=InFlight.RUNNING, active=9).outcome is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("exc", "code", "text", "outcome"), [
    (NotFound("no such file"), 1, "not found", "not-found"),
    (Refused("outside the tree"), 2, "refused", "refused"),
    (RenderFailed("missing variable"), 0, "render error", "render-error"),
])
def test_refusals_of_the_tree(exc: Exception, code: int, text: str, outcome: str) -> None:
    assert refuse_open(exc) == Refuse(code, text, outcome)  # type: ignore[arg-type]


def test_denied_names_its_server_and_carries_the_denial() -> None:
    exc = Denied("3f1c0000-0000-4000-8000-000000000001", "127.0.0.9")
    refusal = refuse_open(exc)
    assert (refusal.code, refusal.outcome, refusal.server, refusal.denied) == \
        (2, "denied", "3f1c0000-0000-4000-8000-000000000001", exc)
    assert refusal.message == exc.reply_text() and not refusal.from_listener


def test_netascii_only_from_memory() -> None:
    assert refuse_netascii("octet", in_memory=False) is None
    assert refuse_netascii("netascii", in_memory=True) is None
    assert refuse_netascii("netascii", in_memory=False) == Refuse(
        tp.ErrorCode.NOT_DEFINED, "netascii not available here", "bad-mode")
