"""The one wording of a failed bind (udpio.udp.bind_error_text, BindError): pure, from the errno."""

from __future__ import annotations

import errno
import socket

import pytest

from udpio.udp import BindError, bind_error_text


@pytest.mark.parametrize(("err", "port", "text"), [
    (errno.EADDRINUSE, 69, "cannot listen on 0.0.0.0:69: Address already in use (another program is listening there)"),
    (errno.EACCES, 67, "cannot listen on 0.0.0.0:67: Permission denied (port 67 needs root or CAP_NET_BIND_SERVICE)"),
    (errno.EPERM, 53, "cannot listen on 0.0.0.0:53: Operation not permitted "
                      "(port 53 needs root or CAP_NET_BIND_SERVICE)"),
    (errno.EACCES, 8080, "cannot listen on 0.0.0.0:8080: Permission denied"),  # not a privileged port
    (errno.EADDRNOTAVAIL, 69, "cannot listen on 0.0.0.0:69: Cannot assign requested address "
                              "(no interface has this address)"),
    (errno.EINVAL, 69, "cannot listen on 0.0.0.0:69: Invalid argument"),
])
def test_bind_error_text_from_the_errno(err: int, port: int, text: str) -> None:
    # the words of the layer that raised do not matter (aiohttp and asyncio wrap them in their own)
    assert bind_error_text("0.0.0.0", port, OSError(err, "[wrapped by some layer]")) == text


def test_a_resolver_error_keeps_its_own_words() -> None:
    e = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert bind_error_text("nosuchhost", 69, e) == "cannot listen on nosuchhost:69: Name or service not known"


def test_an_error_without_errno() -> None:
    assert bind_error_text("h", 1, OSError("odd")) == "cannot listen on h:1: odd"


def test_bind_error_is_an_oserror_with_the_errno_and_only_the_text() -> None:
    e = BindError("127.0.0.1", 4011, OSError(errno.EADDRINUSE, "in use"))
    assert isinstance(e, OSError) and e.errno == errno.EADDRINUSE and (e.host, e.port) == ("127.0.0.1", 4011)
    assert str(e) == "cannot listen on 127.0.0.1:4011: Address already in use (another program is listening there)"
    # wrapped again (the composition root re-explaining an OSError): the same words, not nested ones
    assert bind_error_text("127.0.0.1", 4011, e) == str(e)
