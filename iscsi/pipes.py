"""Byte streams between the backends and whoever carries them (the appliances' HTTP channel, a test):
async iterators of bytes, a subprocess's stdout read as one, and one fed into a subprocess's stdin.

`run_command` (iscsi.runner) collects output whole; a `zfs send` of a template is gigabytes, so
these stream it with the same rules: argv lists, the exit status checked, stderr in the error, and
the child reaped whatever happens to the caller (error, early stop, cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from iscsi.model import StorageError
from iscsi.runner import CommandError, CommandResult

CHUNK = 1 << 20
_STDERR_KEEP = 64 * 1024
EXIT_WAIT = 30.0  # how long a receiver whose input was cut gets to clean up before it is killed


async def guarded(chunks: AsyncIterator[bytes], what: str) -> AsyncGenerator[bytes, None]:
    """`chunks` with the source's own failure (a broken connection, the sender's error) turned into a
    StorageError naming `what`; the source is closed when this is (use it under contextlib.aclosing)."""
    try:
        async for chunk in chunks:
            yield chunk
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"{what}: the stream broke off: {exc}") from exc
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            # a sender's generator releases its files or reaps its `zfs send` now, not at GC
            with contextlib.suppress(Exception):
                await aclose()


async def _drain(stream: asyncio.StreamReader | None) -> bytes:
    """A child's stderr, read all along (a full pipe would stall it); the end of it is kept."""
    kept = b""
    if stream is None:
        return kept
    while chunk := await stream.read(CHUNK):
        kept = (kept + chunk)[-_STDERR_KEEP:]
    return kept


async def _spawn(argv: Sequence[str], *, stdin: int, stdout: int) -> asyncio.subprocess.Process:
    """stdin/stdout: an asyncio.subprocess constant or a file descriptor."""
    args = tuple(argv)
    try:
        return await asyncio.create_subprocess_exec(*args, stdin=stdin, stdout=stdout,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise CommandError(CommandResult(args, 127, "", ""), f"{args[0]}: command not found") from None


async def _reap(proc: asyncio.subprocess.Process, errors: asyncio.Task[bytes]) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    if not errors.done():
        errors.cancel()
    await asyncio.gather(errors, return_exceptions=True)


def _failed(argv: Sequence[str], rc: int, stderr: bytes) -> CommandError:
    return CommandError(CommandResult(tuple(argv), rc, "", stderr.decode("utf-8", "replace")))


async def stream_output(argv: Sequence[str]) -> AsyncIterator[bytes]:
    """The child's stdout in chunks of at most CHUNK bytes (the pipe's own flow control is the
    backpressure: an unread chunk stops the child); CommandError at the end if it exited non-zero.

    The pipe is made here, not by asyncio, so that an early stop can close its read end: zfs-fuse's
    `zfs send` hands the pipe to the zfs-fuse daemon, which goes on writing into it after the client
    is killed. With the read end open the daemon blocked forever (the pool stayed "busy") and so did
    the wait for the child (Python 3.11 waits until every pipe of the child is closed); closed, the
    daemon's next write fails and it lets go."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    try:
        proc = await _spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    errors = asyncio.ensure_future(_drain(proc.stderr))
    reader = asyncio.StreamReader(limit=CHUNK)
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport: asyncio.BaseTransport | None = None
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        while chunk := await reader.read(CHUNK):
            yield chunk
        rc = await proc.wait()
        if rc != 0:
            raise _failed(argv, rc, await errors)
    finally:
        if transport is not None:
            transport.close()
        else:
            pipe.close()
        await _reap(proc, errors)


async def feed_input(argv: Sequence[str], chunks: AsyncIterator[bytes]) -> None:
    """Write `chunks` into the child's stdin (each write waits for the pipe to drain), then close it
    and wait; CommandError if it exits non-zero. If the source fails or the caller is cancelled, the
    child's stdin is closed first, so it sees a cut stream and cleans up after itself (`zfs recv`
    removes what it had begun), and is killed only if it has not exited within EXIT_WAIT."""
    proc = await _spawn(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    errors = asyncio.ensure_future(_drain(proc.stderr))
    stdin = proc.stdin
    assert stdin is not None
    try:
        try:
            async for chunk in chunks:
                stdin.write(chunk)
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child stopped reading: its exit status and stderr say why
        except BaseException:
            stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), EXIT_WAIT)
            raise
        stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.wait_closed()
        rc = await proc.wait()
        if rc != 0:
            raise _failed(argv, rc, await errors)
    finally:
        await _reap(proc, errors)
