"""The `file` volume backend: no ZFS, a directory of sparse image files.

Layout: `<dir>/<volume>.img`; a template snapshot is a read-only copy `<dir>/<os>-template@<v>.img`;
a clone is a copy of the snapshot file, made by reflink (FICLONE) when the filesystem can, else by a
sparse copy (SEEK_DATA/SEEK_HOLE, zero blocks skipped). A clone's origin is kept in a sidecar
`<volume>.json`, so `list()` reports it and destroying a snapshot that has clones is refused.

An OS volume's own snapshot is a read-only copy `<dir>/<volume>@<snap>.img` made the same way, with a
sidecar `<volume>@<snap>.json` holding its creation time (nanoseconds, strictly after the volume's
other snapshots), which orders them: restoring one with newer ones after it is refused, as ZFS does.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Literal

import naming
from iscsi import names, pipes, volstream
from iscsi.image_stream import ImageEncoder, ImageWriter, data_ranges, digest_file
from iscsi.model import InUseError, NameError_, PoolCapacity, StorageError, VolumeInfo
from iscsi.runner import CommandRunner

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EPERM}
CloneMethod = Literal["reflink", "sparse-copy"]
ExportedGuard = Callable[[str], bool]
MAX_RECEIVE_SIZE = 64 << 40  # a stream claiming a larger volume is refused before anything is made


def reflink(src: Path, dst: Path) -> bool:
    """Clone `src` to a new file `dst` with FICLONE; False (and no `dst`) if the filesystem can't."""
    with open(src, "rb") as s:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(fd, FICLONE, s.fileno())
        except OSError as exc:
            os.close(fd)
            dst.unlink(missing_ok=True)
            if exc.errno in _NO_REFLINK:
                return False
            raise
        except BaseException:
            os.close(fd)
            dst.unlink(missing_ok=True)
            raise
        os.close(fd)
    return True


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data regions of `src` (SEEK_DATA/SEEK_HOLE), then fsync: holes stay holes."""
    with open(src, "rb") as s, open(dst, "xb") as d:
        size = os.fstat(s.fileno()).st_size
        for start, end in data_ranges(s.fileno(), size):
            _copy_range(s.fileno(), d.fileno(), start, end)
        os.ftruncate(d.fileno(), size)
        os.fsync(d.fileno())


def _copy_range(sfd: int, dfd: int, start: int, end: int) -> None:
    """Copy [start, end) in the kernel (copy_file_range); by reads and writes where it can't."""
    off = start
    while off < end:
        try:
            n = os.copy_file_range(sfd, dfd, end - off, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            return
        off += n
    while off < end:
        chunk = os.pread(sfd, min(_CHUNK, end - off), off)
        if not chunk:
            return
        if chunk != _ZEROS[: len(chunk)]:  # keep zero blocks as holes
            os.pwrite(dfd, chunk, off)
        off += len(chunk)


def clone_file(src: Path, dst: Path) -> CloneMethod:
    if reflink(src, dst):
        return "reflink"
    sparse_copy(src, dst)
    return "sparse-copy"


def replace_with_copy(src: Path, dst: Path) -> CloneMethod:
    """The existing file dst gets src's content, atomically: a clone made beside dst (with dst's mode) is
    renamed over it. Whoever still has the old dst open keeps the old content."""
    mode = dst.stat().st_mode & 0o777
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        method = clone_file(src, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)
    return method


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_origin(sidecar: Path) -> str | None:
    try:
        data = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"{sidecar}: unreadable origin record: {exc}") from None
    origin = data.get("origin") if isinstance(data, dict) else None
    return origin if isinstance(origin, str) else None


class FileBackend:
    name = "file"

    def __init__(self, directory: Path, runner: CommandRunner | None = None) -> None:
        self.directory = Path(directory)
        self._runner = runner  # unused: this backend runs no external command
        self._lock = asyncio.Lock()
        self.clone_method: CloneMethod | None = None  # what the last clone really used
        self.max_receive_size = MAX_RECEIVE_SIZE
        self._receiving: set[str] = set()  # names being received now: a second receive is refused
        # sha256 of immutable snapshot images, by (path, inode, size, mtime): hashing a 100G sparse
        # template costs a minute of CPU for its holes alone
        self._digests: dict[tuple[str, int, int, int], str] = {}

    # -- paths --------------------------------------------------------------------------------

    def path(self, volume: str) -> str:
        return str(self._img(names.volume(volume)))

    def _img(self, name: str) -> Path:
        return self.directory / f"{name}.img"

    def _sidecar(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def status(self) -> Mapping[str, object]:
        return {
            "backend": "file",
            "directory": str(self.directory),
            "clone_method": self.clone_method or "unknown (no clone made yet)",
        }

    # -- blocking parts (run in a thread) -----------------------------------------------------

    def _create_sparse(self, name: str, size: int) -> VolumeInfo:
        self.directory.mkdir(parents=True, exist_ok=True)
        img = self._img(name)
        try:
            with open(img, "xb") as f:
                f.truncate(size)
        except FileExistsError:
            raise StorageError(f"volume {name} already exists") from None
        return self._info(name)

    def _info(self, name: str) -> VolumeInfo:
        st = self._img(name).stat()
        return VolumeInfo(name, st.st_size, st.st_blocks * 512, _read_origin(self._sidecar(name)),
                          str(self._img(name)))

    def _clone(self, src: Path, dst_name: str, origin: str | None, readonly: bool) -> CloneMethod:
        dst = self._img(dst_name)
        if dst.exists():
            raise StorageError(f"volume {dst_name} already exists")
        tmp = self.directory / f".{dst_name}.img.tmp"
        tmp.unlink(missing_ok=True)
        try:
            method = clone_file(src, tmp)
            if readonly:
                os.chmod(tmp, 0o444)
            if origin is not None:
                _write_json(self._sidecar(dst_name), {"origin": origin})
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if origin is not None:
                self._sidecar(dst_name).unlink(missing_ok=True)
            raise
        return method

    def _entries(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """(volume names, snapshot names) present in the directory; stray files are ignored."""
        vols, snaps = [], []
        try:
            files = sorted(p.name for p in self.directory.iterdir())
        except FileNotFoundError:
            return [], []
        for fname in files:
            if not fname.endswith(".img") or fname.startswith("."):
                continue
            stem = fname[:-4]
            try:
                if "@" in stem:
                    names.parse_snapshot(stem)
                    snaps.append(stem)
                else:
                    vols.append(names.volume(stem))
            except NameError_:
                continue
        return vols, snaps

    def _clones_of(self, snapshot: str) -> builtins.list[str]:
        vols, _ = self._entries()
        return [v for v in vols if _read_origin(self._sidecar(v)) == snapshot]

    # -- VolumeBackend ------------------------------------------------------------------------

    async def create_template(self, os_name: str, size: int) -> VolumeInfo:
        name = names.template_volume(os_name)
        _check_size(size)
        async with self._lock:
            return await asyncio.to_thread(self._create_sparse, name, size)

    async def create_data(self, os_name: str, server_uuid: str, index: int, size: int) -> VolumeInfo:
        name = names.data_volume(os_name, server_uuid, index)
        _check_size(size)
        async with self._lock:
            return await asyncio.to_thread(self._create_sparse, name, size)

    async def snapshot_template(self, os_name: str, version: str) -> None:
        template = names.template_volume(os_name)
        snap = names.snapshot_name(os_name, version)
        async with self._lock:
            src = self._img(template)
            if not await asyncio.to_thread(src.exists):
                raise StorageError(f"template {template} does not exist")
            self.clone_method = await asyncio.to_thread(self._clone, src, snap, None, True)

    async def clone_os(self, os_name: str, version: str, server_uuid: str, generation: int = 1) -> VolumeInfo:
        snap = names.snapshot_name(os_name, version)
        name = names.os_volume(os_name, server_uuid, generation)
        async with self._lock:
            src = self._img(snap)
            if not await asyncio.to_thread(src.exists):
                raise StorageError(f"snapshot {snap} does not exist")
            self.clone_method = await asyncio.to_thread(self._clone, src, name, snap, False)
            return await asyncio.to_thread(self._info, name)

    async def destroy_snapshot(self, os_name: str, version: str) -> None:
        snap = names.snapshot_name(os_name, version)
        async with self._lock:
            clones = await asyncio.to_thread(self._clones_of, snap)
            if clones:
                raise InUseError(f"snapshot {snap} has clones: {_some(clones)}")
            await asyncio.to_thread(self._img(snap).unlink, True)

    async def destroy(self, volume: str, *, exported: ExportedGuard | None = None) -> None:
        """Destroy a volume (a missing one is a no-op, so compensations can repeat).

        Refused (InUseError) if `exported(volume)` says it is still exported, or for a template whose
        snapshots have clones; a template's unused snapshots go with it, and so do an OS volume's own
        snapshots.
        """
        vol = names.parse_volume(volume)
        if exported is not None and exported(vol.name):
            raise InUseError(f"volume {vol.name} is still exported")
        async with self._lock:
            await asyncio.to_thread(self._destroy, vol)

    def _destroy(self, vol: names.VolumeName) -> None:
        if vol.kind == "template":
            _, snaps = self._entries()
            mine = [s for s in snaps if s.startswith(f"{vol.name}@")]
            clones = [c for s in mine for c in self._clones_of(s)]
            if clones:
                raise InUseError(f"template {vol.name} has clones: {_some(clones)}")
            for s in mine:
                self._img(s).unlink(missing_ok=True)
        elif vol.kind == "os":
            # an OS volume's snapshots go first: a crash in between leaves a volume, never orphans
            for snap in self._volume_snapshots(vol.name):
                self._destroy_volume_snapshot(f"{vol.name}@{snap}")
        self._img(vol.name).unlink(missing_ok=True)
        self._sidecar(vol.name).unlink(missing_ok=True)

    async def snapshots(self) -> builtins.list[str]:
        return (await asyncio.to_thread(self._entries))[1]

    # -- snapshots of an OS volume, and copies ------------------------------------------------

    def _volume_snapshots(self, volume: str) -> builtins.list[str]:
        """The snapshots `<volume>@<snap>.img` of an OS volume, oldest first (by the creation time in
        each one's sidecar; a snapshot without one sorts by its image's mtime)."""
        prefix = f"{volume}@"
        found: builtins.list[tuple[int, str]] = []
        try:
            files = [p.name for p in self.directory.iterdir()]
        except FileNotFoundError:
            return []
        for fname in files:
            if not (fname.startswith(prefix) and fname.endswith(".img")):
                continue
            snap = fname[len(prefix):-4]
            if not naming.SNAPSHOT.ok(snap):
                continue
            try:
                found.append((self._created_ns(f"{prefix}{snap}"), snap))
            except FileNotFoundError:  # destroyed meanwhile
                continue
        return [snap for _, snap in sorted(found)]

    def _created_ns(self, full: str) -> int:
        try:
            data = json.loads(self._sidecar(full).read_text())
        except (OSError, ValueError):
            data = None
        created = data.get("created_ns") if isinstance(data, dict) else None
        if isinstance(created, int) and not isinstance(created, bool):
            return created
        return self._img(full).stat().st_mtime_ns

    def _volume_snapshots_if_any(self, volume: str) -> builtins.list[str] | None:
        return self._volume_snapshots(volume) if self._img(volume).exists() else None

    def _snapshot_volume(self, volume: str, snap: str) -> CloneMethod:
        full = names.volume_snapshot(volume, snap)
        src = self._img(volume)
        if not src.exists():
            raise StorageError(f"volume {volume} does not exist")
        if self._img(full).exists():
            raise StorageError(f"snapshot {full} already exists")
        existing = [self._created_ns(f"{volume}@{s}") for s in self._volume_snapshots(volume)]
        # strictly after every existing one, whatever the clock did: "oldest first" is creation order
        created = max([time.time_ns(), *(c + 1 for c in existing)])
        _write_json(self._sidecar(full), {"created_ns": created})
        try:
            return self._clone(src, full, None, True)
        except BaseException:
            self._sidecar(full).unlink(missing_ok=True)
            raise

    def _destroy_volume_snapshot(self, full: str) -> None:
        self._img(full).unlink(missing_ok=True)
        self._sidecar(full).unlink(missing_ok=True)

    def _restore_volume_snapshot(self, volume: str, snap: str) -> CloneMethod:
        full = names.volume_snapshot(volume, snap)
        img = self._img(volume)
        check_restorable(volume, snap, self._volume_snapshots_if_any(volume))
        return replace_with_copy(self._img(full), img)

    def _copy_volume(self, src: str, dst: str) -> CloneMethod:
        if src == dst:
            raise StorageError(f"cannot copy volume {src} onto itself")
        src_img, dst_img = self._img(src), self._img(dst)
        try:
            size = src_img.stat().st_size
        except FileNotFoundError:
            raise StorageError(f"volume {src} does not exist") from None
        try:
            st = dst_img.stat()
        except FileNotFoundError:
            return self._clone(src_img, dst, None, False)
        if st.st_size != size:
            raise StorageError(f"volume {dst} is {st.st_size} bytes, {src} is {size}: a copy needs the same size")
        return replace_with_copy(src_img, dst_img)

    async def snapshot_volume(self, volume: str, snap: str) -> None:
        """A read-only copy `<volume>@<snap>.img` (reflink or sparse) of an OS volume."""
        names.volume_snapshot(volume, snap)
        async with self._lock:
            self.clone_method = await asyncio.to_thread(self._snapshot_volume, volume, snap)

    async def volume_snapshots(self, volume: str) -> builtins.list[str]:
        return await asyncio.to_thread(self._volume_snapshots, names.os_volume_name(volume))

    async def destroy_volume_snapshot(self, volume: str, snap: str) -> None:
        full = names.volume_snapshot(volume, snap)
        async with self._lock:
            await asyncio.to_thread(self._destroy_volume_snapshot, full)

    async def restore_volume_snapshot(self, volume: str, snap: str) -> None:
        """The snapshot cloned beside the volume's image and renamed over it: whoever still has the old
        image open (an export the caller should have removed) keeps the old content."""
        names.volume_snapshot(volume, snap)
        async with self._lock:
            self.clone_method = await asyncio.to_thread(self._restore_volume_snapshot, volume, snap)

    async def copy_volume(self, src: str, dst: str) -> VolumeInfo:
        src_name, dst_name = names.volume(src), names.volume(dst)
        async with self._lock:
            self.clone_method = await asyncio.to_thread(self._copy_volume, src_name, dst_name)
            return await asyncio.to_thread(self._info, dst_name)

    async def capacity(self) -> PoolCapacity:
        def statvfs() -> PoolCapacity:
            self.directory.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.directory)
            total = st.f_blocks * st.f_frsize
            return PoolCapacity(total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize)

        return await asyncio.to_thread(statvfs)

    async def list(self) -> builtins.list[VolumeInfo]:
        def scan() -> builtins.list[VolumeInfo]:
            out = []
            for name in self._entries()[0]:
                try:
                    out.append(self._info(name))
                except FileNotFoundError:  # destroyed meanwhile
                    continue
            return out

        return await asyncio.to_thread(scan)


    # -- streams to and from another appliance (template replication, moving a server) -------------
    #
    # Sent as volstream frames (full, or a delta against a template snapshot both sides hold), received
    # into a hidden `.<name>.img.recv` beside the target and renamed into place only once complete and
    # verified: nothing half-made is ever visible under a volume's or snapshot's name.

    def send_template(self, os_name: str, version: str, *, base: str | None = None) -> AsyncIterator[bytes]:
        """`<os>-template@<version>`; with `base`, a delta against `<os>-template@<base>` (the
        receiver applies it to its own copy of that version: on a reflink filesystem the new version
        shares the old one's blocks there as it does here)."""
        snap = names.snapshot_name(os_name, version)
        base_img = self._img(names.snapshot_name(os_name, base)) if base is not None else None
        return self._send(snap, self._img(snap), base_img, cache=True)

    def send_volume(self, volume: str, *, origin: tuple[str, str] | None = None) -> AsyncIterator[bytes]:
        """A server's volume (the node is off, so it does not change meanwhile); with `origin` (an OS
        clone's template version, which the receiver holds) a delta against that snapshot."""
        vol = movable_volume(volume, origin)
        base_img = self._img(names.snapshot_name(*origin)) if origin is not None else None
        return self._send(vol, self._img(vol), base_img, cache=False)

    async def _send(self, name: str, img: Path, base: Path | None, *, cache: bool) -> AsyncIterator[bytes]:
        try:
            enc = await asyncio.to_thread(ImageEncoder, img, base)
        except FileNotFoundError as exc:
            missing = Path(exc.filename or img).name.removesuffix(".img")
            raise StorageError(f"{missing} does not exist") from None
        try:
            while (frame := await asyncio.to_thread(enc.next_frame)) is not None:
                yield frame
        finally:
            await asyncio.to_thread(enc.close)
        if cache and enc.digest is not None:
            key = await asyncio.to_thread(_digest_key, img)
            if key is not None:
                self._digests[key] = volstream.checksum_text(enc.digest)

    async def receive_template(self, os_name: str, version: str, chunks: AsyncIterator[bytes], *,
                               base: str | None = None) -> str:
        """`<os>-template@<version>` from a stream (a delta needs `base` held here); the template
        volume is made from it too when this appliance has none yet (an existing one is left as it
        is: a build or capture rewrites it whole). Returns "sha256:<hex>" of the content."""
        template = names.template_volume(os_name)
        snap = names.snapshot_name(os_name, version)
        base_img = self._img(names.snapshot_name(os_name, base)) if base is not None else None

        def finish(tmp: Path) -> None:
            os.chmod(tmp, 0o444)
            made = None
            if not self._img(template).exists():
                made = self._img(template)
                self._clone(tmp, template, None, False)
            try:
                os.replace(tmp, self._img(snap))  # last: once the snapshot is there, all of it is
            except BaseException:
                if made is not None:
                    made.unlink(missing_ok=True)
                raise

        checksum = await self._receive(snap, chunks, base_img, finish)
        key = await asyncio.to_thread(_digest_key, self._img(snap))
        if key is not None:
            self._digests[key] = checksum
        return checksum

    async def receive_volume(self, volume: str, chunks: AsyncIterator[bytes], *,
                             origin: tuple[str, str] | None = None) -> str:
        """A server's volume from a stream; with `origin` it becomes a clone of that template snapshot
        here (a delta is applied to a reflink or sparse copy of it; `list()` reports the origin)."""
        vol = movable_volume(volume, origin)
        snap = names.snapshot_name(*origin) if origin is not None else None

        def finish(tmp: Path) -> None:
            if snap is not None:
                _write_json(self._sidecar(vol), {"origin": snap})
            try:
                os.replace(tmp, self._img(vol))
            except BaseException:
                self._sidecar(vol).unlink(missing_ok=True)
                raise

        return await self._receive(vol, chunks, self._img(snap) if snap is not None else None, finish)

    async def _receive(self, name: str, chunks: AsyncIterator[bytes], base: Path | None,
                       finish: Callable[[Path], None]) -> str:
        """Decode into `.<name>.img.recv`, then `finish(tmp)` renames it into place under the lock. The
        source is closed however this ends (a refusal before its first byte included)."""
        async with contextlib.aclosing(pipes.guarded(chunks, f"receiving {name}")) as source:
            return await self._receive_from(name, source, base, finish)

    async def _receive_from(self, name: str, source: AsyncIterator[bytes], base: Path | None,
                            finish: Callable[[Path], None]) -> str:
        if name in self._receiving:
            raise StorageError(f"{name} is being received already")
        self._receiving.add(name)
        tmp = self.directory / f".{name}.img.recv"
        writer: ImageWriter | None = None
        try:
            async with self._lock:
                if await asyncio.to_thread(self._img(name).exists):
                    raise StorageError(f"{name} already exists here: a copy never overwrites it")
            await asyncio.to_thread(self._prepare_receive, tmp, base)
            writer = ImageWriter(tmp, base_copied=base is not None)
            decoder = volstream.Decoder(self.max_receive_size)
            async for chunk in source:
                await asyncio.to_thread(writer.absorb, decoder, chunk)
            decoder.close()
            await asyncio.to_thread(writer.close)
            assert writer.digest is not None  # the decoder saw the trailer, the writer checked it
            async with self._lock:
                if await asyncio.to_thread(self._img(name).exists):
                    raise StorageError(f"{name} already exists here: a copy never overwrites it")
                await asyncio.to_thread(finish, tmp)
            return volstream.checksum_text(writer.digest)
        except BaseException:
            if writer is not None:
                await asyncio.to_thread(writer.close)
            await asyncio.to_thread(tmp.unlink, True)
            raise
        finally:
            self._receiving.discard(name)

    def _prepare_receive(self, tmp: Path, base: Path | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left by a receive a crash cut short
        if base is None:
            return
        try:
            self.clone_method = clone_file(base, tmp)  # a delta patches a copy of the base
        except FileNotFoundError:
            raise StorageError(f"{base.name.removesuffix('.img')} does not exist here: "
                               "the stream's base must be received first") from None

    async def template_checksum(self, os_name: str, version: str) -> str:
        """"sha256:<hex>" of `<os>-template@<version>`'s content (cached: snapshots never change)."""
        img = self._img(names.snapshot_name(os_name, version))
        key = await asyncio.to_thread(_digest_key, img)
        if key is None:
            raise StorageError(f"snapshot {img.name.removesuffix('.img')} does not exist")
        if key not in self._digests:
            self._digests[key] = volstream.checksum_text(await asyncio.to_thread(digest_file, img))
        return self._digests[key]

    async def volume_checksum(self, volume: str) -> str:
        """"sha256:<hex>" of a volume's content now (what `send_volume` sends while its node is off)."""
        img = self._img(names.volume(volume))
        try:
            return volstream.checksum_text(await asyncio.to_thread(digest_file, img))
        except FileNotFoundError:
            raise StorageError(f"volume {names.volume(volume)} does not exist") from None


def movable_volume(volume: str, origin: tuple[str, str] | None) -> str:
    """A server's volume (templates travel by send_template); only an OS volume has an origin."""
    vol = names.parse_volume(volume)
    if vol.kind == "template":
        raise StorageError(f"{vol.name} is a template volume: send its versions with send_template")
    if origin is not None:
        names.snapshot_name(*origin)
        if vol.kind != "os":
            raise StorageError(f"{vol.name} is a data volume: only an OS volume is a clone of a template")
    return vol.name


def _digest_key(img: Path) -> tuple[str, int, int, int] | None:
    try:
        st = img.stat()
    except FileNotFoundError:
        return None
    return str(img), st.st_ino, st.st_size, st.st_mtime_ns


def check_restorable(volume: str, snap: str, snapshots: builtins.list[str] | None) -> None:
    """Refuse restoring `volume@snap` given the volume's snapshots oldest first (None: no such volume):
    one with newer snapshots after it is refused by name, as `zfs rollback` without `-r` refuses it."""
    full = names.volume_snapshot(volume, snap)
    if snapshots is None:
        raise StorageError(f"volume {volume} does not exist")
    if snap not in snapshots:
        raise StorageError(f"snapshot {full} does not exist")
    newer = snapshots[snapshots.index(snap) + 1:]
    if newer:
        raise InUseError(f"snapshot {full} has newer snapshots: {_some(newer)} "
                         "(restore the newest, or destroy those first)")


def _some(items: builtins.list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512:
        raise StorageError(f"invalid volume size {size!r}: a positive multiple of 512 bytes")
