"""The `zfs` volume backend: `zfs` commands with argv lists, parsing `zfs get -Hp` (exact bytes).

Two kinds: `zvol` (default; `/dev/zvol/<pool>/<name>`, sparse `-s -V`) and `file` (a sparse
`disk.img` inside its own dataset, like a TrueNAS file extent; the only kind zfs-fuse can run).
`zfs get -Hp` is used instead of `zfs list -p` because zfs-fuse has no `list -p` and no `clones`
property: clones are found from every dataset's `origin`. When OpenZFS's `libzfs_core` Python
bindings (pyzfs) import, create/snapshot/clone/destroy go through them instead of the CLI.

An OS volume's own snapshots are ZFS snapshots `<pool>/<volume>@<snap>`, ordered by `createtxg`;
restoring one is `zfs rollback` (never `-r`: newer snapshots are refused by name instead).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import importlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import naming
from iscsi import names, pipes
from iscsi.file_backend import check_restorable, movable_volume, replace_with_copy
from iscsi.model import InUseError, NameError_, PoolCapacity, StorageError, VolumeInfo
from iscsi.runner import CommandError, CommandRunner, default_runner
from iscsi.zfs_stream import BEGIN_SIZE, SendBegin, parse_begin

ZfsKind = Literal["zvol", "file"]
ExportedGuard = Callable[[str], bool]
IMAGE = "disk.img"
LIST_PROPS = "type,volsize,used,referenced,origin,mountpoint,available"
ZVOL_ALIGN = 128 * 1024  # round zvol sizes up to the largest volblocksize: `zfs create -V` needs a multiple
# What send_volume snapshots and sends. Outside naming.SNAPSHOT (the ':'), so no operator's snapshot can
# have this name and volume_snapshots() does not list it.
MOVE_SNAPSHOT = "cello:move"


class ZfsOutputError(ValueError):
    """`zfs get -Hp` output not in `name<TAB>property<TAB>value` lines; `offset` is the byte offset."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """`zfs get -Hp -o name,property,value …` → {dataset: {property: value}} (order kept)."""
    out: dict[str, dict[str, str]] = {}
    offset = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if body:
            parts = body.split("\t")
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise ZfsOutputError(f"expected 3 tab-separated fields, got {body[:60]!r}", offset)
            out.setdefault(parts[0], {})[parts[1]] = parts[2]
        offset += len(line.encode())
    return out


def _int(props: Mapping[str, str], key: str, dataset: str) -> int:
    value = props.get(key, "-")
    if value == "-":
        return 0
    if not value.isdigit():
        raise StorageError(f"zfs get: {dataset} {key}={value!r} is not an exact byte count (-p missing?)")
    return int(value)


def _load_lzc() -> ModuleType | None:
    try:
        return importlib.import_module("libzfs_core")
    except ImportError:
        return None


class ZfsBackend:
    name = "zfs"

    def __init__(
        self,
        pool: str,
        kind: ZfsKind = "zvol",
        runner: CommandRunner | None = None,
        *,
        use_lzc: bool | None = None,
        zvol_dir: str = "/dev/zvol",
        mountpoint: Path | None = None,
        device_timeout: float = 10.0,
    ) -> None:
        if kind not in ("zvol", "file"):
            raise NameError_(f"invalid zfs volume kind {kind!r}: zvol or file")
        self.pool = names.pool(pool)
        self.kind: ZfsKind = kind
        self._run = runner or default_runner()
        # auto (None): libzfs_core only with the real CLI runner — a recording runner means "check the argv"
        lzc = _load_lzc() if use_lzc is True or (use_lzc is None and runner is None) else None
        if use_lzc and lzc is None:
            raise StorageError("libzfs_core (pyzfs) was requested but does not import")
        self._lzc = lzc
        self.zvol_dir = zvol_dir
        self._mountpoint = Path(mountpoint) if mountpoint is not None else None
        self._device_timeout = device_timeout
        self._lock = asyncio.Lock()
        self._receiving: set[str] = set()  # datasets being received now: a second receive is refused

    # -- names and paths ----------------------------------------------------------------------

    def _ds(self, name: str) -> str:
        return f"{self.pool}/{name}"

    def path(self, volume: str) -> str:
        vol = names.volume(volume)
        if self.kind == "zvol":
            return f"{self.zvol_dir}/{self.pool}/{vol}"
        if self._mountpoint is None:
            raise StorageError(f"mountpoint of {self.pool} not known yet (no zfs command has run)")
        return str(self._mountpoint / vol / IMAGE)

    def status(self) -> Mapping[str, object]:
        return {
            "backend": "zfs",
            "pool": self.pool,
            "kind": self.kind,
            "api": "libzfs_core" if self._lzc is not None else "zfs CLI",
            "clone_method": "zfs clone",
        }

    # -- zfs plumbing -------------------------------------------------------------------------

    async def _zfs(self, *args: str) -> str:
        return (await self._run(["zfs", *args])).stdout

    async def _get(self, props: str, dataset: str, *, recursive: bool = False) -> dict[str, dict[str, str]]:
        argv = ["get", "-Hp", *(["-r"] if recursive else []), "-o", "name,property,value", props, dataset]
        try:
            return parse_get(await self._zfs(*argv))
        except ZfsOutputError as exc:
            raise StorageError(f"zfs get: {exc}") from None

    async def _all(self) -> dict[str, dict[str, str]]:
        got = await self._get(LIST_PROPS, self.pool, recursive=True)
        if self.kind == "file" and self._mountpoint is None:
            mp = got.get(self.pool, {}).get("mountpoint", "-")
            if mp.startswith("/"):
                self._mountpoint = Path(mp)
        return got

    async def _learn_mountpoint(self) -> None:
        if self.kind == "file" and self._mountpoint is None:
            got = await self._get("mountpoint", self.pool)
            mp = got.get(self.pool, {}).get("mountpoint", "-")
            if not mp.startswith("/"):
                raise StorageError(f"{self.pool} has no mountpoint ({mp}); the file kind needs one")
            self._mountpoint = Path(mp)

    async def _lzc_call(self, fn: str, *args: Any) -> None:
        assert self._lzc is not None
        try:
            await asyncio.to_thread(getattr(self._lzc, fn), *args)
        except Exception as exc:  # pyzfs raises its own ZFSError hierarchy
            raise StorageError(f"libzfs_core.{fn}{args!r}: {exc}") from exc

    async def _create(self, name: str, size: int) -> VolumeInfo:
        _check_size(size)
        async with self._lock:
            await self._create_unlocked(name, size)
            return await self._info(name)

    async def _create_unlocked(self, name: str, size: int) -> None:
        ds = self._ds(name)
        if self.kind == "zvol":
            size = -(-size // ZVOL_ALIGN) * ZVOL_ALIGN
            if self._lzc is not None:
                await self._lzc_call("lzc_create", ds.encode(), "zvol", {b"volsize": size})
            else:
                await self._zfs("create", "-s", "-V", str(size), ds)
            await self._wait_device(name)
        else:
            await self._learn_mountpoint()
            if self._lzc is not None:
                await self._lzc_call("lzc_create", ds.encode(), "zfs", {})
                await self._zfs("mount", ds)
            else:
                await self._zfs("create", ds)
            try:
                await asyncio.to_thread(_make_sparse, Path(self.path(name)), size)
            except BaseException:
                await self._zfs("destroy", ds)  # nothing half-made
                raise

    async def _wait_device(self, name: str) -> None:
        if self._device_timeout <= 0:
            return
        dev = self.path(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._device_timeout
        while not await asyncio.to_thread(os.path.exists, dev):
            if loop.time() > deadline:
                raise StorageError(f"{dev} did not appear within {self._device_timeout:g}s (udev?)")
            await asyncio.sleep(0.05)

    async def _info(self, name: str) -> VolumeInfo:
        ds = self._ds(name)
        got = (await self._get(LIST_PROPS, ds)).get(ds)
        if got is None:
            raise StorageError(f"zfs get printed nothing for {ds}")
        return await self._to_info(name, got)

    async def _to_info(self, name: str, props: Mapping[str, str]) -> VolumeInfo:
        origin = props.get("origin", "-")
        origin_name = origin.removeprefix(f"{self.pool}/") if origin != "-" else None
        if self.kind == "zvol":
            size = _int(props, "volsize", name)
            return VolumeInfo(name, size, _int(props, "used", name), origin_name, self.path(name))
        mp = props.get("mountpoint", "-")
        img = Path(mp) / IMAGE if mp.startswith("/") else Path(self.path(name))
        size = await asyncio.to_thread(_size_or_zero, img)
        return VolumeInfo(name, size, _int(props, "used", name), origin_name, str(img))

    # -- VolumeBackend ------------------------------------------------------------------------

    async def create_template(self, os_name: str, size: int) -> VolumeInfo:
        return await self._create(names.template_volume(os_name), size)

    async def create_data(self, os_name: str, server_uuid: str, index: int, size: int) -> VolumeInfo:
        return await self._create(names.data_volume(os_name, server_uuid, index), size)

    async def snapshot_template(self, os_name: str, version: str) -> None:
        snap = self._ds(names.snapshot_name(os_name, version))
        async with self._lock:
            if self._lzc is not None:
                await self._lzc_call("lzc_snapshot", [snap.encode()])
            else:
                await self._zfs("snapshot", snap)

    async def clone_os(self, os_name: str, version: str, server_uuid: str, generation: int = 1) -> VolumeInfo:
        snap = self._ds(names.snapshot_name(os_name, version))
        name = names.os_volume(os_name, server_uuid, generation)
        ds = self._ds(name)
        async with self._lock:
            await self._learn_mountpoint()
            if self._lzc is not None:
                await self._lzc_call("lzc_clone", ds.encode(), snap.encode(), {})
                if self.kind == "file":
                    await self._zfs("mount", ds)
            else:
                await self._zfs("clone", snap, ds)
            if self.kind == "zvol":
                await self._wait_device(name)
            return await self._info(name)

    def _clones(self, everything: Mapping[str, Mapping[str, str]], snapshots: set[str]) -> builtins.list[str]:
        return sorted(ds.removeprefix(f"{self.pool}/") for ds, p in everything.items()
                      if p.get("origin", "-") in snapshots)

    async def destroy_snapshot(self, os_name: str, version: str) -> None:
        await self._destroy_snapshot(self._ds(names.snapshot_name(os_name, version)))

    async def _destroy_snapshot(self, snap: str) -> None:
        """Destroy `pool/…@snap`: a missing one is a no-op, one with clones is refused."""
        async with self._lock:
            everything = await self._all()
            if snap not in everything:
                return
            clones = self._clones(everything, {snap})
            if clones:
                raise InUseError(f"snapshot {snap} has clones: {_some(clones)}")
            if self._lzc is not None:
                await self._lzc_call("lzc_destroy_snaps", [snap.encode()], False)
            else:
                await self._zfs("destroy", snap)

    async def destroy(self, volume: str, *, exported: ExportedGuard | None = None) -> None:
        """Destroy a volume (a missing one is a no-op, so compensations can repeat).

        Refused (InUseError) if `exported(volume)` says it is still exported, or for a template whose
        snapshots have clones; a template's unused snapshots go with it (`zfs destroy -r`).
        """
        vol = names.parse_volume(volume)
        if exported is not None and exported(vol.name):
            raise InUseError(f"volume {vol.name} is still exported")
        ds = self._ds(vol.name)
        async with self._lock:
            everything = await self._all()
            if ds not in everything:
                return
            snaps = {n for n in everything if n.startswith(f"{ds}@")}
            clones = self._clones(everything, snaps)
            if clones:
                raise InUseError(f"{vol.kind} {vol.name} has clones: {_some(clones)}")
            if self.kind == "file":
                await self._run(["zfs", "umount", ds], check=False)
            if self._lzc is not None:
                if snaps:
                    await self._lzc_call("lzc_destroy_snaps", [s.encode() for s in sorted(snaps)], False)
                await self._lzc_call("lzc_destroy", ds.encode())
                return
            await self._zfs_patiently("destroy", *(["-r"] if snaps else []), ds)

    async def _zfs_patiently(self, *args: str) -> None:
        """A `zfs` command retried while zfs-fuse reports "dataset is busy" (it does for a moment after
        an unmount, and around a rollback of a mounted dataset)."""
        for attempt in range(5):
            try:
                await self._zfs(*args)
                return
            except CommandError as exc:
                if "busy" not in exc.result.stderr or attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def list(self) -> builtins.list[VolumeInfo]:
        everything = await self._all()
        out = []
        for ds, props in everything.items():
            name = ds.removeprefix(f"{self.pool}/")
            if ds == name or "/" in name or "@" in name:
                continue
            try:
                names.volume(name)
            except NameError_:
                continue  # not ours
            out.append(await self._to_info(name, props))
        return sorted(out, key=lambda v: v.name)

    async def snapshots(self) -> builtins.list[str]:
        out = []
        for ds in await self._all():
            name = ds.removeprefix(f"{self.pool}/")
            if ds != name and "@" in name:
                try:
                    names.parse_snapshot(name)
                except NameError_:
                    continue
                out.append(name)
        return sorted(out)

    # -- snapshots of an OS volume, and copies ------------------------------------------------

    async def _snapshots_of(self, ds: str) -> builtins.list[str] | None:
        """Every snapshot of dataset `ds` (names after the @), oldest first; None if `ds` is missing.

        Ordered by `createtxg` (1-second `creation` ties; a txg is what `zfs rollback` means by
        "more recent"). zfs-fuse has `createtxg` as a hidden property that `zfs get` still prints.
        """
        result = await self._run(["zfs", "get", "-Hp", "-r", "-o", "name,property,value", "createtxg", ds],
                                 check=False)
        if result.returncode != 0:
            if "does not exist" in result.stderr:
                return None
            raise CommandError(result)
        try:
            got = parse_get(result.stdout)
        except ZfsOutputError as exc:
            raise StorageError(f"zfs get: {exc}") from None
        found = []
        for name, props in got.items():
            parent, at, snap = name.partition("@")
            if parent == ds and at:
                found.append((_int(props, "createtxg", name), snap))
        return [snap for _, snap in sorted(found)]

    async def snapshot_volume(self, volume: str, snap: str) -> None:
        full = names.volume_snapshot(volume, snap)
        ds = self._ds(volume)
        async with self._lock:
            existing = await self._snapshots_of(ds)
            if existing is None:
                raise StorageError(f"volume {volume} does not exist")
            if snap in existing:
                raise StorageError(f"snapshot {full} already exists")
            if self._lzc is not None:
                await self._lzc_call("lzc_snapshot", [self._ds(full).encode()])
            else:
                await self._zfs("snapshot", self._ds(full))

    async def volume_snapshots(self, volume: str) -> builtins.list[str]:
        """Cello's snapshots of an OS volume, oldest first (one named outside Cello's rule is left out)."""
        found = await self._snapshots_of(self._ds(names.os_volume_name(volume)))
        return [s for s in found or [] if naming.SNAPSHOT.ok(s)]

    async def destroy_volume_snapshot(self, volume: str, snap: str) -> None:
        await self._destroy_snapshot(self._ds(names.volume_snapshot(volume, snap)))

    async def restore_volume_snapshot(self, volume: str, snap: str) -> None:
        """`zfs rollback` (the CLI even with libzfs_core: it unmounts and remounts a file-kind dataset).
        Never `-r`: newer snapshots are refused by name here instead of destroyed."""
        full = names.volume_snapshot(volume, snap)
        async with self._lock:
            check_restorable(volume, snap, await self._snapshots_of(self._ds(volume)))
            await self._zfs_patiently("rollback", self._ds(full))

    async def copy_volume(self, src: str, dst: str) -> VolumeInfo:
        """dst gets src's bytes: the file kind copies the image inside the mountpoints (reflink where the
        pool can clone blocks, else sparse); a zvol is copied with `dd conv=sparse` onto a new dst (a
        sparse zvol reads zeros, so skipping zero blocks is exact) and fully onto an existing one.

        The copy itself runs outside the backend's lock (a zvol's dd takes minutes; creates and clones of
        other servers go on meanwhile); a dst this call created is destroyed again if the copy fails."""
        src_name, dst_name = names.volume(src), names.volume(dst)
        if src_name == dst_name:
            raise StorageError(f"cannot copy volume {src_name} onto itself")
        async with self._lock:
            everything = await self._all()
            if self._ds(src_name) not in everything:
                raise StorageError(f"volume {src_name} does not exist")
            source = await self._to_info(src_name, everything[self._ds(src_name)])
            created = self._ds(dst_name) not in everything
            if created:
                _check_size(source.size)
                await self._create_unlocked(dst_name, source.size)
            else:
                target = await self._to_info(dst_name, everything[self._ds(dst_name)])
                if target.size != source.size:
                    raise StorageError(f"volume {dst_name} is {target.size} bytes, {src_name} is {source.size}: "
                                       "a copy needs the same size")
        try:
            if self.kind == "zvol":
                await self._run(["dd", f"if={source.path}", f"of={self.path(dst_name)}", "bs=1048576",
                                 "conv=sparse,fsync" if created else "conv=fsync", "status=none"])
            else:
                await asyncio.to_thread(replace_with_copy, Path(source.path), Path(self.path(dst_name)))
        except BaseException:
            if created:  # nothing half-made
                async with self._lock:
                    if self.kind == "file":
                        await self._run(["zfs", "umount", self._ds(dst_name)], check=False)
                    await self._zfs_patiently("destroy", self._ds(dst_name))
            raise
        return await self._info(dst_name)

    async def capacity(self) -> PoolCapacity:
        got = (await self._get("used,available", self.pool)).get(self.pool, {})
        used, free = _int(got, "used", self.pool), _int(got, "available", self.pool)
        return PoolCapacity(used + free, used, free)

    # -- streams to and from another appliance (template replication, moving a server) -------------
    #
    # `zfs send` streamed from its stdout, `zfs recv` fed through its stdin (pipes). Before recv sees a
    # byte, the stream's BEGIN record is checked against what was asked for (the snapshot it carries,
    # full or from the right base): `zfs recv pool/x@snap` would otherwise take whatever came under
    # that name. Verification is zfs's own: recv checks the stream's checksums, and the received
    # snapshot's guid (carried over by send/recv) must be the stream's toguid and the sender's.

    def send_template(self, os_name: str, version: str, *, base: str | None = None) -> AsyncIterator[bytes]:
        snap = self._ds(names.snapshot_name(os_name, version))
        since = ["-i", self._ds(names.snapshot_name(os_name, base))] if base is not None else []
        return pipes.stream_output(["zfs", "send", *since, snap])

    def send_volume(self, volume: str, *, origin: tuple[str, str] | None = None) -> AsyncIterator[bytes]:
        """`zfs send [-i <pool>/<os>-template@<v>] <pool>/<volume>@cello:move`, of a snapshot taken
        now (a stale one from an earlier attempt is replaced: the volume may have changed since)."""
        name = movable_volume(volume, origin)
        since = ["-i", self._ds(names.snapshot_name(*origin))] if origin is not None else []
        return self._send_volume(name, since)

    async def _send_volume(self, name: str, since: builtins.list[str]) -> AsyncIterator[bytes]:
        snap = self._ds(f"{name}@{MOVE_SNAPSHOT}")
        async with self._lock:
            existing = await self._snapshots_of(self._ds(name))
            if existing is None:
                raise StorageError(f"volume {name} does not exist")
            if MOVE_SNAPSHOT in existing:
                await self._zfs_patiently("destroy", snap)
            await self._zfs("snapshot", snap)
        async for chunk in pipes.stream_output(["zfs", "send", *since, snap]):
            yield chunk

    async def template_checksum(self, os_name: str, version: str) -> str:
        return f"zfs-guid:{await self._guid(self._ds(names.snapshot_name(os_name, version)))}"

    async def volume_checksum(self, volume: str) -> str:
        """The guid of `<volume>@cello:move`, the snapshot the last `send_volume` sent."""
        snap = self._ds(f"{movable_volume(volume, None)}@{MOVE_SNAPSHOT}")
        return f"zfs-guid:{await self._guid(snap)}"

    async def _guid(self, snap: str) -> int:
        result = await self._run(["zfs", "get", "-Hp", "-o", "name,property,value", "guid", snap], check=False)
        if result.returncode != 0:
            if "does not exist" in result.stderr:
                raise StorageError(f"snapshot {snap.removeprefix(self.pool + '/')} does not exist")
            raise CommandError(result)
        value = parse_get(result.stdout).get(snap, {}).get("guid", "")
        if not value.isdigit():
            raise StorageError(f"zfs get: {snap} guid={value!r} is not a number")
        return int(value)

    async def receive_template(self, os_name: str, version: str, chunks: AsyncIterator[bytes], *,
                               base: str | None = None) -> str:
        """`zfs recv <pool>/<os>-template@<version>`: a full stream makes the template dataset (none may
        be here), an incremental one adds the snapshot to it (`base` must be its newest snapshot, and
        the dataset unchanged since: no `-F`, which would roll back or destroy what is here)."""
        template = names.template_volume(os_name)
        snap = names.snapshot_name(os_name, version)
        base_snap = names.snapshot_name(os_name, base) if base is not None else None

        async def check() -> int:
            everything = await self._all()
            if self._ds(snap) in everything:
                raise StorageError(f"snapshot {snap} already exists here: a copy never overwrites it")
            if base_snap is None:
                if self._ds(template) in everything:
                    raise StorageError(f"template {template} exists here: send {version} incrementally "
                                       "from a version it holds (base)")
                return 0
            return await self._guid(self._ds(base_snap))

        def expect(begin: SendBegin, base_guid: int) -> None:
            _expect(begin, snap, base_guid, clone=False, base=base_snap)

        checksum = await self._receive(self._ds(template), self._ds(snap), chunks, check, expect,
                                       undo=self._ds(template) if base_snap is None else self._ds(snap))
        if self.kind == "zvol" and base_snap is None:
            try:
                await self._wait_device(template)  # a build or capture writes it through /dev/zvol later
            except BaseException:
                await self._undo_receive(self._ds(template))
                raise
        return checksum

    async def receive_volume(self, volume: str, chunks: AsyncIterator[bytes], *,
                             origin: tuple[str, str] | None = None) -> str:
        """`zfs recv <pool>/<volume>@cello:move`; with `origin` the stream is a clone's, incremental
        from that snapshot, and the volume becomes its clone here (`zfs get origin`). The received
        `@cello:move` snapshot is destroyed once checked (the volume goes on from there)."""
        name = movable_volume(volume, origin)
        origin_snap = names.snapshot_name(*origin) if origin is not None else None
        ds = self._ds(name)

        async def check() -> int:
            if ds in await self._all():
                raise StorageError(f"volume {name} already exists here: a move never overwrites it")
            return await self._guid(self._ds(origin_snap)) if origin_snap is not None else 0

        def expect(begin: SendBegin, base_guid: int) -> None:
            _expect(begin, f"{name}@{MOVE_SNAPSHOT}", base_guid, clone=origin_snap is not None, base=origin_snap)

        checksum = await self._receive(ds, f"{ds}@{MOVE_SNAPSHOT}", chunks, check, expect, undo=ds)
        try:
            async with self._lock:
                await self._zfs_patiently("destroy", f"{ds}@{MOVE_SNAPSHOT}")
            if self.kind == "zvol":
                await self._wait_device(name)
        except BaseException:
            await self._undo_receive(ds)
            raise
        return checksum

    async def _receive(self, ds: str, target: str, chunks: AsyncIterator[bytes],
                       check: Callable[[], Awaitable[int]], expect: Callable[[SendBegin, int], None], *,
                       undo: str) -> str:
        """Check (under the lock) that nothing is in the way, check the stream's BEGIN record, `zfs recv
        target`, compare the guids; on any failure destroy `undo` if the receive made it. The source is
        closed however this ends (a refusal before its first byte included)."""
        if ds in self._receiving:
            raise StorageError(f"{ds.removeprefix(self.pool + '/')} is being received already")
        self._receiving.add(ds)
        began = False
        try:
            async with contextlib.aclosing(pipes.guarded(chunks, f"receiving {target}")) as source:
                async with self._lock:
                    base_guid = await check()
                    await self._learn_mountpoint()
                head = await _read_at_least(source, BEGIN_SIZE)
                begin = parse_begin(head)
                expect(begin, base_guid)
                began = True
                async with contextlib.aclosing(_chain(head, source)) as stream:
                    await pipes.feed_input(["zfs", "recv", target], stream)
            guid = await self._guid(target)
            if guid != begin.toguid:
                raise StorageError(f"received {target} has guid {guid}, the stream's is {begin.toguid}")
            return f"zfs-guid:{guid}"
        except BaseException:
            if began:  # zfs recv removes what it began on a cut stream; this is for what it finished
                await self._undo_receive(undo)
            raise
        finally:
            self._receiving.discard(ds)

    async def _undo_receive(self, what: str) -> None:
        """Destroy a dataset (with its snapshots) or a snapshot a failed receive left, if it is here."""
        async with self._lock:
            if what not in await self._all():
                return
            if "@" not in what and self.kind == "file":
                await self._run(["zfs", "umount", what], check=False)
            await self._zfs_patiently("destroy", *([] if "@" in what else ["-r"]), what)


def _expect(begin: SendBegin, snapshot: str, base_guid: int, *, clone: bool, base: str | None) -> None:
    """Refuse a stream that is not of `snapshot` (without its pool), not from the base held here (guid
    `base_guid`, 0 for none) or not a clone's where a clone is asked for."""
    if begin.snapshot != snapshot:
        raise StorageError(f"the stream carries {begin.toname}, not {snapshot}")
    if begin.fromguid != base_guid:
        if base_guid == 0:
            raise StorageError(f"the stream of {snapshot} is incremental, but no base was named for it")
        if begin.fromguid == 0:
            raise StorageError(f"the stream of {snapshot} is a full one, not incremental from {base}")
        raise StorageError(f"the stream of {snapshot} is incremental from another snapshot than {base} here "
                           f"(guid {begin.fromguid}, {base} is {base_guid})")
    if begin.clone != clone:
        raise StorageError(f"the stream of {snapshot} is {'' if begin.clone else 'not '}a clone's")


async def _read_at_least(source: AsyncIterator[bytes], n: int) -> bytes:
    head = b""
    async for chunk in source:
        head += chunk
        if len(head) >= n:
            break
    return head


async def _chain(head: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield head
    async for chunk in rest:
        yield chunk


def _make_sparse(img: Path, size: int) -> None:
    with open(img, "xb") as f:
        f.truncate(size)


def _size_or_zero(img: Path) -> int:
    try:
        return img.stat().st_size
    except FileNotFoundError:
        return 0


def _some(items: builtins.list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512:
        raise StorageError(f"invalid volume size {size!r}: a positive multiple of 512 bytes")
