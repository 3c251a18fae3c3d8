"""The native TFTP data pump (`bootfiles/native/tftp_pump.c`), loaded with ctypes.

`scripts/setup.sh` builds the shared object next to its source (`make setup`; Linux only, it needs
epoll and eventfd). The server (`tftp_server.py`, `tftp.engine`) hands a transfer over once Python
has decided and negotiated it: the pump sends the first datagram in the calling thread, then runs the
DATA phase on a thread of its own, and reports each transfer's end through `notify_fd`, which the
event loop reads (`take`). The pump closes a transfer's socket at its end; the caller keeps the file's
bytes (or its descriptor) alive until then.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCE = NATIVE_DIR / "tftp_pump.c"
LIBRARY = NATIVE_DIR / "libcellotftp.so"

Outcome = Literal["ok", "tsize-probe", "aborted", "timeout", "error"]
_OUTCOMES: tuple[Outcome, ...] = ("ok", "tsize-probe", "aborted", "timeout", "error")
_TAKE_MAX = 256
_HOST_FIELD = 64  # bytes of the peer's address text in struct cello_pump_params


class _Params(ctypes.Structure):
    _fields_ = [  # mirrors struct cello_pump_params
        ("id", ctypes.c_uint64),
        ("fd", ctypes.c_int32),
        ("file_fd", ctypes.c_int32),
        ("data", ctypes.c_char_p),
        ("size", ctypes.c_int64),
        ("blksize", ctypes.c_uint32),
        ("windowsize", ctypes.c_uint32),
        ("timeout", ctypes.c_double),
        ("timeout_from_client", ctypes.c_int32),
        ("max_retries", ctypes.c_int32),
        ("backoff_max", ctypes.c_double),
        ("oack", ctypes.c_char_p),
        ("oack_len", ctypes.c_uint32),
        ("tsize_accepted", ctypes.c_int32),
        ("family", ctypes.c_int32),
        ("scope_id", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("host", ctypes.c_char * _HOST_FIELD),
    ]


class _Done(ctypes.Structure):
    _fields_ = [  # mirrors struct cello_pump_done
        ("id", ctypes.c_uint64),
        ("outcome", ctypes.c_int32),
        ("retransmissions", ctypes.c_uint32),
        ("bytes_acked", ctypes.c_int64),
        ("error", ctypes.c_char * 112),
    ]


@dataclass(frozen=True)
class Completion:
    id: int
    outcome: Outcome
    retransmissions: int
    bytes_sent: int
    error: str | None


class PumpError(OSError):
    """The pump would not take a transfer (the caller still owns its socket)."""


_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def load() -> ctypes.CDLL | None:
    """The library, or None (why: `unavailable_reason`). Loaded once per process."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    if not LIBRARY.exists():
        _load_error = f"{LIBRARY} is not built (make setup builds it, on Linux)"
        return None
    if SOURCE.exists() and SOURCE.stat().st_mtime_ns > LIBRARY.stat().st_mtime_ns:
        _load_error = f"{LIBRARY} is older than {SOURCE.name}: run make setup again"
        return None
    try:
        # PyDLL: calls keep the interpreter lock. Each is a few microseconds and never waits for the
        # pump's thread (which never takes the lock), so letting the lock go and taking it again would
        # only add to every request's cost.
        lib = ctypes.PyDLL(str(LIBRARY))
    except OSError as exc:
        _load_error = f"{LIBRARY}: {exc}"
        return None
    lib.cello_pump_abi.restype = ctypes.c_uint32
    lib.cello_pump_abi.argtypes = []
    if lib.cello_pump_abi() != abi():
        _load_error = f"{LIBRARY} does not match tftp_native.py's structures (rebuild it: make setup)"
        return None
    lib.cello_pump_new.restype = ctypes.c_void_p
    lib.cello_pump_new.argtypes = []
    lib.cello_pump_notify_fd.restype = ctypes.c_int
    lib.cello_pump_notify_fd.argtypes = [ctypes.c_void_p]
    lib.cello_pump_start.restype = ctypes.c_int
    lib.cello_pump_start.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Params)]
    lib.cello_pump_take.restype = ctypes.c_int
    lib.cello_pump_take.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Done), ctypes.c_int]
    lib.cello_pump_abort_all.restype = None
    lib.cello_pump_abort_all.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.cello_pump_free.restype = None
    lib.cello_pump_free.argtypes = [ctypes.c_void_p]
    _lib = lib
    return lib


def abi() -> int:
    """What `cello_pump_abi` returns for the structures as declared here."""
    return ctypes.sizeof(_Params) << 16 | ctypes.sizeof(_Done)


def unavailable_reason() -> str | None:
    load()
    return _load_error


Address = tuple[str, int] | tuple[str, int, int, int]


class Prepared:
    """A transfer's parameters but its socket and peer: what `Pump.start` hands over. A storm's requests
    for one file with the same options share one (the server keeps them), so that a request costs the
    setting of three fields, not eighteen. Holds the file's bytes alive."""

    __slots__ = ("data", "params", "ref")

    def __init__(self, params: _Params, data: bytes | None) -> None:
        self.params = params
        self.ref = ctypes.byref(params)
        self.data = data


def prepare(*, data: bytes | None, file_fd: int, size: int, blksize: int, windowsize: int, timeout: float,
            timeout_from_client: bool, retries: int, backoff_max: float, oack: bytes, tsize_accepted: bool,
            family: int) -> Prepared:
    """`data` is the whole file, or None with `file_fd` to pread (the caller's to keep open until the
    transfer's completion); `oack` b"": no OACK, DATA 1 goes first."""
    if data is not None and size != len(data):
        raise ValueError("the size of a file in memory is its length")  # the pump reads `size` bytes of it
    p = _Params()
    p.file_fd = file_fd
    p.data = data
    p.size = size
    p.blksize = blksize
    p.windowsize = windowsize
    p.timeout = timeout
    p.timeout_from_client = int(timeout_from_client)
    p.max_retries = retries
    p.backoff_max = backoff_max
    p.oack = oack or None
    p.oack_len = len(oack)
    p.tsize_accepted = int(tsize_accepted)
    p.family = family
    return Prepared(p, data)


class Pump:
    """One pump: its thread, its transfers. Methods are called from the event loop's thread."""

    def __init__(self) -> None:
        lib = load()
        if lib is None:
            raise PumpError(_load_error or "native TFTP pump unavailable")
        handle = lib.cello_pump_new()
        if not handle:
            raise PumpError("native TFTP pump: could not make its epoll, eventfds or thread")
        self._lib = lib
        self._handle: int | None = handle
        self.notify_fd: int = lib.cello_pump_notify_fd(handle)
        self._next_id = 1
        # Kept alive while the pump reads them: the file's bytes of every running transfer.
        self._held: dict[int, bytes | None] = {}
        self._done = (_Done * _TAKE_MAX)()
        self._start = lib.cello_pump_start

    @property
    def running(self) -> int:
        return len(self._held)

    def start(self, prepared: Prepared, sock_fd: int, peer: Address) -> int:
        """Hand a transfer over on `sock_fd` (its port, the TID) to `peer`; its id. The pump owns the
        socket from here on and closes it at the end; on PumpError the caller still owns it."""
        if self._handle is None:
            raise PumpError("native TFTP pump is closed")
        ident = self._next_id
        self._next_id += 1
        p = prepared.params
        p.id = ident
        p.fd = sock_fd
        host = peer[0]
        # IPv6: the scope is a field of its own, not part of the address text. Set for every start:
        # the parameters are shared by a storm's requests, and a previous peer's scope must not stay.
        p.scope_id = peer[3] if len(peer) == 4 else 0
        if len(peer) == 4:
            host = host.split("%", 1)[0]
        encoded = host.encode()
        if len(encoded) >= _HOST_FIELD or not 0 <= peer[1] <= 0xFFFF:  # the C side terminates at 64
            raise PumpError(errno.EINVAL, f"native TFTP pump: not a peer address: {peer!r}")
        p.port = peer[1]
        p.host = encoded
        self._held[ident] = prepared.data  # before the start: the thread may read it at once
        rc = self._start(self._handle, prepared.ref)
        if rc != 0:
            del self._held[ident]
            raise PumpError(-rc, f"native TFTP pump refused the transfer: {errno.errorcode.get(-rc, rc)}")
        return ident

    def take(self) -> list[Completion]:
        """The transfers that ended since the last call (call when `notify_fd` is readable)."""
        if self._handle is None:
            return []
        n = self._lib.cello_pump_take(self._handle, self._done, _TAKE_MAX)
        out: list[Completion] = []
        for d in self._done[:n]:
            self._held.pop(d.id, None)
            error = d.error.decode(errors="replace") or None
            out.append(Completion(d.id, _OUTCOMES[d.outcome], d.retransmissions, d.bytes_acked, error))
        return out

    def abort_all(self, reason: str) -> None:
        """Every running transfer ends: an ERROR to its client, then an "aborted" completion."""
        if self._handle is not None:
            self._lib.cello_pump_abort_all(self._handle, reason.encode()[:90])

    def close(self) -> None:
        """Stops the thread; transfers still running are cut without a word (call `abort_all` first)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._lib.cello_pump_free(handle)
            self._held.clear()
