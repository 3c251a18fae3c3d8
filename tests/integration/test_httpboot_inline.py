"""HTTP boot's remembered resolutions (web/httpboot.py RESOLVE_TTL) and the in-loop FileResponse they
allow: the second fetch of a file within the TTL resolves nothing again and still honours ranges,
conditional requests and the `http` event."""

from __future__ import annotations

import pytest

from tests.integration.test_api_stack import INITRD, KERNEL, Stack, api_stack_in_memory
from web import httpboot

__all__ = ["api_stack_in_memory"]


async def test_a_boot_file_is_resolved_once_within_the_ttl(api_stack_in_memory: Stack,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    s = api_stack_in_memory
    calls: list[str] = []
    real = httpboot.resolve_boot_file

    def counted(files_root, loader_roots, rel):  # type: ignore[no-untyped-def]
        calls.append(rel)
        return real(files_root, loader_roots, rel)

    monkeypatch.setattr(httpboot, "resolve_boot_file", counted)
    for _ in range(3):
        async with s.client.get(f"/boot/files/{KERNEL}") as resp:
            assert resp.status == 200 and await resp.read() == (s.files_root / KERNEL).read_bytes()
    assert calls == [KERNEL]
    async with s.client.get("/boot/files/no/such/file") as resp:  # a miss is not remembered
        assert resp.status == 404
    async with s.client.get("/boot/files/no/such/file") as resp:
        assert resp.status == 404
    assert calls == [KERNEL, "no/such/file", "no/such/file"]


async def test_a_remembered_file_keeps_ranges_conditionals_and_events(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    async with s.client.get(f"/boot/files/{INITRD}") as resp:  # resolves and remembers
        assert resp.status == 200
        etag = resp.headers["ETag"]
    async with s.client.get(f"/boot/files/{INITRD}", headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206 and await resp.read() == b"I" * 100
        assert resp.headers["Content-Range"] == "bytes 100-199/123457"
    async with s.client.get(f"/boot/files/{INITRD}", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    async with s.client.get(f"/boot/files/{INITRD}", headers={"Range": "bytes=999999-"}) as resp:
        assert resp.status == 416
    async with s.client.head(f"/boot/files/{INITRD}") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "123457"
    fetches = [(e.data["bytes"], e.data["status"]) for e in s.events.recent() if e.kind == "http"]
    assert fetches[-5:] == [(123_457, 200), (100, 206), (0, 304), (0, 416), (0, 200)]
    (s.files_root / INITRD).unlink()  # removed while remembered: a 404, not a traceback
    async with s.client.get(f"/boot/files/{INITRD}") as resp:
        assert resp.status == 404
