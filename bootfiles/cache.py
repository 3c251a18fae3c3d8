"""A bounded in-memory cache of static boot files, and a file-backed reader for the ones too big for it.

A boot storm reads the same kernel and initrd hundreds of times: the first request loads the file in a
worker thread, concurrent requests for it wait for that one load (single flight), and later ones are
served from memory. Entries are keyed by (device, inode, size, mtime), so a replaced file is reloaded
on its next request; least recently used entries are dropped when the byte budget is reached.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from pathlib import Path

CacheKey = tuple[int, int, int, int]


def cache_key(st: os.stat_result) -> CacheKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileSource:
    """Reads blocks of a file too large for the cache with pread (one window at a time, page cache)."""

    __slots__ = ("_fd", "_size")

    def __init__(self, path: Path, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def fileno(self) -> int:
        """The descriptor (the native TFTP pump reads it; it stays this object's to close)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _ignore_result(task: asyncio.Task[bytes]) -> None:
    if not task.cancelled():
        task.exception()  # a failed prefetch is retried by the next request


class FileCache:
    def __init__(self, max_bytes: int = 512 * 1024 * 1024, max_entry_bytes: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // 2 if max_entry_bytes is None else max_entry_bytes
        self._entries: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._loading: dict[CacheKey, asyncio.Future[bytes]] = {}
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def peek(self, st: os.stat_result) -> bytes | None:
        """The cached bytes if loaded, without waiting."""
        key = cache_key(st)
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return data

    def prefetch(self, path: Path, st: os.stat_result) -> None:
        """Start loading in the background (single flight); errors are only logged by get()'s caller."""
        key = cache_key(st)
        if key in self._entries or key in self._loading:
            return
        task = asyncio.get_running_loop().create_task(self.get(path, st))
        task.add_done_callback(_ignore_result)

    def cacheable(self, size: int) -> bool:
        return size <= self.max_entry_bytes and size <= self.max_bytes

    async def get(self, path: Path, st: os.stat_result) -> bytes:
        """The file's bytes (it must be cacheable)."""
        key = cache_key(st)
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return data
        pending = self._loading.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) get it re-raised
            raise
        finally:
            self._loading.pop(key, None)
        future.set_result(data)
        self._insert(key, data)
        return data

    def _insert(self, key: CacheKey, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self._entries[key] = data
        self.used_bytes += len(data)
        while self.used_bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= len(old)
